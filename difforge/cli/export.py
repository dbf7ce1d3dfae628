"""`difforge export onnx`: the bare network as an ONNX graph (difforge.pipeline.backends)."""

from __future__ import annotations

import typer

from difforge.cli.app import app, friendly_errors

export_app = typer.Typer(
    name="export",
    help="Export a model's network for other runtimes (ONNX).",
    no_args_is_help=True,
)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
@friendly_errors
def onnx_command(
    model: str = typer.Option(..., "--model", help="Model folder."),
    out: str = typer.Option(..., "--out", help="The .onnx file to write."),
    opset: int | None = typer.Option(
        None, "--opset", help="ONNX opset [default: difforge.nets.onnx.OPSET]."
    ),
) -> None:
    """Export the bare network (dynamic batch, conditioning as plain tensors), checked
    against eager torch; sample with it via Model.with_backend("onnxruntime", onnx_path=OUT)."""
    from difforge.nets.onnx import OPSET
    from difforge.pipeline import load
    from difforge.pipeline.backends import export_model_onnx

    report = export_model_onnx(load(model), out, opset=OPSET if opset is None else opset)
    typer.echo(
        f"wrote {report.path}: opset {report.opset}, inputs {', '.join(report.inputs)}, "
        f"max |eager - onnxruntime| {report.max_abs_diff:.2g} on the check batch"
    )
