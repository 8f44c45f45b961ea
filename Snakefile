# peftlab: which parameter-efficient fine-tuning method should I use, and why?
# This file is a table of contents: configuration, rule files in pipeline order, targets.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/config_files.smk"


# config/config.yaml, unless --configfile names other files: those then replace it, as
# --replace-workflow-config does (which Snakemake does not pass on to cluster jobs, so jobs
# would otherwise see the two files merged)
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    model=NAME,
    task=NAME,
    method=NAME,
    variant=NAME,
    seed="[0-9]+",
    d="[0-9]+",
    trial="[0-9]+",


include: "workflow/rules/data.smk"
include: "workflow/rules/analyses.smk"
include: "workflow/rules/tuning.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"


localrules:
    all,
    aggregate,
    comparison_report,


rule all:
    input:
        all_targets(),


onerror:
    on_pipeline_error()
