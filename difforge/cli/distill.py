"""`difforge distill guidance|progressive|consistency`: train a few-step student
(difforge.training.distill)."""

from __future__ import annotations

import typer

from difforge.cli.app import command


@command("distill")
def distill_command(
    method: str = typer.Argument(
        ..., help="guidance (w as an input), progressive (N -> N/2) or consistency (Song 2023)."
    ),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model folder."),
    out: str = typer.Option(..., "--out", help="Student model folder to write."),
    steps: int = typer.Option(400, "--steps", help="Optimizer steps."),
    student_steps: int = typer.Option(
        8, "--student-steps", help="The student's sampling steps (progressive: on its grid)."
    ),
    grid: str = typer.Option(
        "karras", "--grid", help="consistency: the student's sampling grid (progressive: karras)."
    ),
    cd_levels: int = typer.Option(
        18, "--cd-levels", help="consistency: N noise levels of the teacher's ODE steps."
    ),
    teacher_substeps: int = typer.Option(
        2,
        "--teacher-substeps",
        help="progressive: teacher Euler steps per student step (2: N -> N/2).",
    ),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-4, "--lr"),
    ema_halflife_steps: float = typer.Option(
        50.0, "--ema-halflife-steps", help="EMA half-life in steps (0: save the last weights)."
    ),
    seed: int = typer.Option(0, "--seed"),
    name: str | None = typer.Option(None, "--name", help="Student model name."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Wall-clock budget."),
) -> None:
    """Distill TEACHER into a student model folder whose provenance names the teacher's sha256."""
    from difforge.training.distill import DistillConfig, distill

    cfg = DistillConfig(
        method=method, teacher=teacher, steps=steps, student_steps=student_steps,
        teacher_substeps=teacher_substeps, grid=grid, cd_levels=cd_levels,
        batch_size=batch_size, lr=lr, ema_halflife_steps=ema_halflife_steps, seed=seed, name=name, max_minutes=max_minutes,
    )  # fmt: skip
    folder = distill(cfg, out, log=typer.echo)
    typer.echo(f"student: {folder}")
