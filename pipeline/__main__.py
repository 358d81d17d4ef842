"""`python -m pipeline ...` and `torchrun ... -m pipeline ...` run the CLI; a process of a job first
arranges to end with the process that launched it."""

from pipeline.launcher import end_with_launcher

end_with_launcher()

from pipeline.cli import main  # noqa: E402

main()
