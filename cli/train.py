"""``train``, ``evaluate`` and ``info``: the model's own commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from resunetpp.cli.common import app, choice_enum, engine_options, fail, sigterm_as_interrupt, write_json_report
from resunetpp.defaults import TORCH_DEVICES
from resunetpp import engines
from resunetpp.errors import ResUNetError
from resunetpp.model_config import ARCHITECTURES

Architecture = choice_enum("Architecture", ARCHITECTURES)
Device = choice_enum("Device", TORCH_DEVICES)
EvalBackend = choice_enum("EvalBackend", ("auto", *engines.backends()))


@app.command()
def train(
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder in the Kvasir-SEG layout (images/, masks/).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: last/best checkpoints, train_state.pt, history.json.")] = Path("runs/train"),
    train_split: Annotated[Optional[str], typer.Option(help="Split file or name (DATA/NAME.txt); default DATA/train.txt if present, else all images.")] = None,
    val_split: Annotated[Optional[str], typer.Option(help="Split file or name; default DATA/val.txt if present, else no validation.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs (default 100; on --resume, the interrupted run's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step (at least 1).")] = 16,
    image_size: Annotated[int, typer.Option(help="Training resolution (square, a multiple of 8, at most 4096).")] = 256,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW, warmup + cosine).")] = 1e-3,
    device: Annotated[Optional[Device], typer.Option(help="auto picks cuda when torch sees a GPU (default auto).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and augmentation.")] = 0,
    num_classes: Annotated[int, typer.Option(min=1, help="1: binary (sigmoid); C >= 2: softmax over C classes.")] = 1,
    class_names: Annotated[Optional[str], typer.Option(help="Comma-separated, one per class (default 'polyp' for one class).")] = None,
    range_reg: Annotated[float, typer.Option(min=0.0, help="Weight of the activation-range penalty (0: off).")] = 0.0,
    range_tau: Annotated[float, typer.Option(min=0.0, help="Magnitude the range penalty starts at.")] = 8.0,
    time_budget_s: Annotated[Optional[float], typer.Option(min=0.0, help="Fit the number of epochs into this many seconds.")] = None,
    warmup_epochs: Annotated[int, typer.Option(min=0, help="Epochs of linear LR warm-up before the cosine decay.")] = 2,
    init_from: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Start from these weights (fine-tuning; a new schedule, not --resume). Recorded in the checkpoints' provenance.")] = None,
    architecture: Annotated[Architecture, typer.Option(help="resunetpp: the authors' model; resunetpp-sigmoid-attention: opt-in variant with a bounded attention gate.")] = Architecture.resunetpp,
) -> None:
    """Train ResUNet++ (Dice+BCE, or CE+Dice for several classes) and write checkpoints atomically."""
    from resunetpp.training import TrainConfig, default_splits, resume_config, train as run_training

    try:
        if resume:
            cfg = resume_config(out, epochs=epochs, time_budget_s=time_budget_s,
                                device=device.value if device else None)
        else:
            if data is None:
                raise ResUNetError("--data DIR is required (a folder with images/ and masks/), unless --resume")
            names = ([n.strip() for n in class_names.split(",") if n.strip()] if class_names
                     else ["polyp"] if num_classes == 1 else [f"class{i}" for i in range(num_classes)])
            tsplit, vsplit = default_splits(data, train_split, val_split)
            cfg = TrainConfig(data=str(data), out=str(out), train_split=tsplit, val_split=vsplit,
                              epochs=epochs or 100, batch_size=batch_size, image_size=image_size, lr=lr,
                              device=device.value if device else "auto", seed=seed, num_classes=num_classes,
                              class_names=names, range_reg=range_reg, range_tau=range_tau,
                              time_budget_s=time_budget_s, warmup_epochs=warmup_epochs,
                              init_from=str(init_from) if init_from else None,
                              architecture=architecture.value)
        with sigterm_as_interrupt():
            result = run_training(cfg, resume=resume)
    except (ResUNetError, FloatingPointError) as e:
        fail(e)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; the last finished epoch is saved, continue with: resunetpp train --out {out} --resume",
                   err=True)
        raise typer.Exit(130) from None
    best = result["best_val_dice"]
    typer.echo(f"trained {result['epochs']} epochs; checkpoints in {out}"
               + (f" (best val Dice {best:.4f} -> best.safetensors)" if best >= 0 else " (no validation split)"))


@app.command()
def evaluate(
    model: Annotated[Optional[Path], typer.Argument(metavar="MODEL", help="Checkpoint, .onnx, OpenVINO .xml or TensorRT .engine to evaluate (default: the shipped model).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder in the Kvasir-SEG layout (default: the shipped sample data).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split file or name (DATA/NAME.txt); default every image.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the scores and per-image rows here (JSON).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per engine call (at least 1).")] = 1,
    device: Annotated[str, typer.Option(help="The backend's device: auto, cpu, cuda[:N]; onnxruntime also tensorrt[:N]; openvino also gpu, npu.")] = "auto",
    backend: Annotated[EvalBackend, typer.Option(help="auto: from the model's suffix.")] = EvalBackend.auto,
    engine_option: Annotated[Optional[list[str]], typer.Option("--engine-option", "-O", help="Backend option KEY=VALUE, repeatable (e.g. precision=bf16); the README lists each backend's keys.")] = None,
    worst: Annotated[int, typer.Option(min=0, help="Also list the N images with the lowest Dice (0: none).")] = 0,
    overlay: Annotated[Optional[Path], typer.Option(file_okay=False, help="Write <stem>_overlay.png of ground truth against prediction here (green: both, red: predicted only, yellow: missed).")] = None,
) -> None:
    """Mean Dice, IoU, precision and recall, per image at the original mask resolution, through any backend."""
    from rich.console import Console

    from resunetpp.defaults import default_data_path, default_model_path
    from resunetpp.engines.evaluate import evaluate_path, results_table, worst_table

    try:
        model = model or default_model_path()
        data = data or default_data_path()
        if model is None:
            raise ResUNetError("no MODEL given and this install ships no default model; pass a checkpoint, "
                               "e.g. resunetpp evaluate runs/train/best.safetensors --data DIR")
        if data is None:
            raise ResUNetError("no --data given and this install ships no sample data; pass --data DIR "
                               "(a folder with images/ and masks/)")
        result = evaluate_path(model, data, split, batch_size=batch_size, device=device,
                               show_progress=sys.stderr.isatty(), backend=backend.value,
                               engine_options=engine_options(engine_option or []), overlay_dir=overlay)
        if json_path is not None:
            write_json_report(json_path, result.as_dict(), "report")
    except ResUNetError as e:
        fail(e)
    console = Console()
    console.print(results_table(result, title=f"{model.name} on {data}" + (f" ({split})" if split else "")))
    if worst:
        console.print(worst_table(result, worst))
    if overlay is not None:
        typer.echo(f"wrote {result.n} overlays to {overlay}")
    if json_path is not None:
        typer.echo(f"wrote {json_path}")


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Versions, available backends, CPU features, GPU, and the shipped default model."""
    from rich.console import Console

    from resunetpp.engines.info import collect_info, info_tables

    data = collect_info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console()
    for table in info_tables(data):
        console.print(table)

