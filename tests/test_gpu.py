"""On a CUDA GPU (skipped without one; bench/gpu.sh runs them where a GPU is lent): the fused loss under
bf16 autocast gives the CPU's fp32 values to bf16 rounding and holds less GPU memory than the logits'
path at a real vocabulary; a student trains end to end on the GPU."""

import pytest
import torch
import torch.nn.functional as F

from pipeline import LogitHead, distillation_loss, linear_distillation_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def case(vocab: int, d: int, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g) * 0.05
    hidden = torch.randn(1, n, d, generator=g)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "topk_ids": torch.randint(0, vocab, (1, n, 64), generator=g),
             "topk_logprobs": torch.log_softmax(torch.randn(1, n, 65, generator=g), -1)[..., :64],
             "tail_logprob": torch.full((1, n), -1.0), "tail_ids": torch.randint(0, vocab, (1, n, 8), generator=g)}
    to = {key: value.to(device) for key, value in batch.items()}
    return weight.to(device).requires_grad_(), hidden.to(device).requires_grad_(), to


def test_the_fused_loss_in_bf16_on_the_gpu_gives_the_cpus_fp32_result():
    results = {}
    for device, autocast in (("cpu", False), ("cuda", True)):
        weight, hidden, batch = case(32_000, 512, 2048, device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = linear_distillation_loss(hidden, LogitHead(weight), batch)
        out.loss.backward()
        results[device] = (out.loss.detach().cpu(), hidden.grad.cpu(), weight.grad.cpu())
    (cpu_loss, cpu_h, cpu_w), (gpu_loss, gpu_h, gpu_w) = results["cpu"], results["cuda"]
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=2e-2, atol=0)
    for ours, theirs in ((gpu_h, cpu_h), (gpu_w, cpu_w)):
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 3e-2


def test_the_fused_loss_holds_less_gpu_memory_than_the_logits_at_a_real_vocabulary():
    """V = 151,936, d = 2,048, 8,192 positions, bf16 autocast: the peak allocated above the inputs."""
    peaks = {}
    for method in ("fused", "logits"):
        weight, hidden, batch = case(151_936, 2048, 8192, "cuda")
        weight.grad, hidden.grad = torch.zeros_like(weight), torch.zeros_like(hidden)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if method == "fused":
                loss = linear_distillation_loss(hidden, LogitHead(weight), batch).loss
            else:
                loss = distillation_loss(F.linear(hidden, weight), batch).loss
        loss.backward()
        torch.cuda.synchronize()
        peaks[method] = torch.cuda.max_memory_allocated() - base
        del weight, hidden, batch, loss
        torch.cuda.empty_cache()
    assert peaks["fused"] <= 0.5 * peaks["logits"], peaks


def test_a_student_trains_on_the_gpu(cache_path, tmp_path):
    from pipeline.settings.student import StudentConfig
    from pipeline.train.log import read_log
    from stages import train_student

    cfg = StudentConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, batch_size=8, shuffle_window=16, num_workers=0,
                        device="cuda", max_steps=20, kd_weight=1.0, lr=1e-2, warmup_steps=2, checkpoint_every=1000)
    metrics = train_student.main(cache_path, tmp_path / "s", cfg, progress=False)
    kd = [row["kd"] for row in read_log(tmp_path / "s")]
    assert metrics["finished"] and len(kd) == 20 and sum(kd[-5:]) < sum(kd[:5])
