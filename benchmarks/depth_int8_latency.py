"""Benchmark: what dropping residual blocks and int8 quantization buy in ONNX Runtime latency.

ResNet-20 (CIFAR-10 subset), trained briefly, exported to ONNX, timed with ONNX Runtime (CPU
execution provider) on one batch, interleaved round by round in one process. The speed-up is the
median over rounds of each round's dense/variant latency ratio (the models of one round saw the
same machine, which matters on a shared one), with its interquartile range.

Variants: the float model; static int8 (QDQ, calibrated, per-channel) with the settings ONNX
Runtime advises for this CPU, and with full-range U8S8 and S8S8; dynamic int8; and the float and
static-int8 models with the 1 and 2 least important blocks dropped (block influence on
calibration batches; not fine-tuned after dropping, so their accuracy is a lower bound).
Accuracy is measured on each ONNX file itself (:class:`evaluators.quantize.OnnxRuntimeModel`),
size is the file's.

    SECATEURS_DATA=/work/shared/data python benchmarks/depth_int8_latency.py [--epochs 2] [--checkpoint /tmp/r20.pt]

Writes benchmarks/results/depth_int8_latency_resnet20_b<batch>_t<threads>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from evaluators import measure
from evaluators.batches import Calibration
from evaluators.blocks import block_importance, discover_blocks, drop_blocks, least_important
from evaluators.models import build_model
from evaluators.onnx_backend import export_program, write_onnx
from evaluators.quantize import OnnxRuntimeModel, cpu_int8_settings, file_size_mb, quantize_onnx, quantized_op_counts
from evaluators.tasks import TaskConfig, make_task
from evaluators.train import FinetuneConfig, accuracy, train

ROOT = Path(__file__).resolve().parents[1]


def rel_iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=2.0, help="brief training, so that accuracies mean something")
    parser.add_argument("--checkpoint", help="load the trained weights from here if it exists, else save them here")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds; each gives one median of --repeats")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per model per round (few: finer interleaving)")
    parser.add_argument("--calibration", type=int, default=256, help="training images for int8 calibration and block importance")
    args = parser.parse_args()

    started = time.perf_counter()
    torch.manual_seed(0)
    task = make_task(TaskConfig(name="cifar10"))
    (x_train, y_train), (x_test, y_test) = task.train_data, task.eval_data  # the built-in tasks hold tensors
    model = task.build_model()
    if args.checkpoint and Path(args.checkpoint).exists():
        model.load_state_dict(torch.load(args.checkpoint))
    else:
        train(model, (x_train, y_train), FinetuneConfig(epochs=args.epochs, lr=0.05), seed=0)
        if args.checkpoint:
            torch.save(model.state_dict(), args.checkpoint)
    model.eval()
    calibration = Calibration.from_tensors(x_train, y_train, batch_size=args.batch, samples=args.calibration)
    batch = x_test[: args.batch].contiguous()
    example = x_test[:1].contiguous()
    blocks = discover_blocks(model, example)
    scores = block_importance(model, calibration, criterion="cosine")
    order = least_important(scores, len(scores))

    folder = Path(tempfile.mkdtemp(prefix="depth_int8_"))
    files: dict[str, Path] = {}
    params: dict[str, int] = {}  # per file name: the parameters and MACs of the model it holds
    macs: dict[str, int] = {}
    for dropped in (0, 1, 2):
        variant = build_model("resnet20")
        variant.load_state_dict(model.state_dict())
        drop_blocks(variant.eval(), order[:dropped], example)
        tag = "dense" if not dropped else f"drop {dropped} ({', '.join(order[:dropped])})"
        mac_count, count = measure.macs_and_params(variant, example)
        float_path = write_onnx(export_program(variant, batch), folder / f"float_{dropped}.onnx")
        files[f"{tag} float"] = float_path
        files[f"{tag} int8 static"] = quantize_onnx(float_path, folder / f"static_{dropped}.onnx", calibration=calibration)
        if not dropped:
            files[f"{tag} int8 static S8S8 full range"] = quantize_onnx(
                float_path, folder / "static_s8s8.onnx", calibration=calibration, activations="int8", reduce_range=False)
            files[f"{tag} int8 static U8S8 full range"] = quantize_onnx(
                float_path, folder / "static_u8s8.onnx", calibration=calibration, activations="uint8", reduce_range=False)
            files[f"{tag} int8 dynamic"] = quantize_onnx(float_path, folder / "dynamic.onnx", mode="dynamic")
        macs.update({name: mac_count for name in files if name not in macs})
        params.update({name: count for name in files if name not in params})

    models = {name: OnnxRuntimeModel(path, threads=args.threads) for name, path in files.items()}
    accuracies = {name: accuracy(m, (x_test, y_test), batch_size=args.batch) for name, m in models.items()}
    calls = {name: m.runner(batch) for name, m in models.items()}
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        stats = measure.interleaved_latency_ms(calls, rounds=1, warmup=1, repeats=args.repeats, threads=args.threads)
        for name, values in stats.items():
            per_round[name].append(values["latency_ms"])

    rows = []
    for name, path in files.items():
        # speed-up within each round (the models of one round saw the same machine), then its median
        speedups = [d / v for d, v in zip(per_round["dense float"], per_round[name])]
        quartiles = statistics.quantiles(speedups, n=4)
        rows.append({
            "model": name,
            "latency_ms_median": round(statistics.median(per_round[name]), 3),
            "latency_ms_best_round": round(min(per_round[name]), 3),
            "latency_rel_iqr": round(rel_iqr(per_round[name]), 4),
            "speedup_vs_dense_float": round(statistics.median(speedups), 3),
            "speedup_iqr": [round(quartiles[0], 3), round(quartiles[2], 3)],
            "per_round_ms": [round(v, 3) for v in per_round[name]],
            "macs": macs[name],
            "accuracy": round(accuracies[name], 4),
            "size_mb": round(file_size_mb(path), 4),
            "params": params[name],
            "int8_ops": quantized_op_counts(path),
        })
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
                   f"execution provider CPUExecutionProvider",
        "int8_settings": cpu_int8_settings(),
        "model": "resnet20", "train_epochs": args.epochs, "test_images": len(x_test),
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "repeats_per_round": args.repeats,
        "blocks": [b.to_dict() for b in blocks],
        "block_influence": {k: round(v, 5) for k, v in scores.items()},
        "rows": rows,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out = ROOT / "benchmarks" / "results" / f"depth_int8_latency_resnet20_b{args.batch}_t{args.threads}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(r["model"]) for r in rows)
    for r in rows:
        print(f"{r['model']:<{width}}  {r['latency_ms_median']:8.2f} ms (best {r['latency_ms_best_round']:6.2f})  "
              f"x{r['speedup_vs_dense_float']:.2f} [{r['speedup_iqr'][0]:.2f}, {r['speedup_iqr'][1]:.2f}]  "
              f"MACs x{macs['dense float'] / r['macs']:.2f}  acc {r['accuracy']:.3f}  {r['size_mb']:.3f} MB")
    print(f"wrote {out.relative_to(ROOT)} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
