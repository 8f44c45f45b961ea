# Thin wrapper: aggregate -> peftlab.report.aggregate
from peftlab.cli import run_step
from peftlab.report import aggregate

sm = snakemake  # noqa: F821

run_step(
    "aggregate",
    sm.log[0],
    lambda: aggregate(list(sm.input.finetune), list(sm.input.evaluate), sm.output.csv, sm.output.parquet),
)
