rule aggregate:
    """Join every run's training record and test metrics into one table."""
    input:
        finetune=all_finetune_records,
        evaluate=all_evaluate_records,
    output:
        csv=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category="Results",
        ),
        parquet=f"{RESULTS}/summary.parquet",
    log:
        "logs/aggregate.log",
    conda:
        "../../envs/peftlab.yaml"
    script:
        "../scripts/aggregate.py"


rule comparison_report:
    """The self-contained HTML comparison report users read."""
    input:
        summary=f"{RESULTS}/summary.parquet",
        finetune=all_finetune_records,
        stats=lambda w: sorted(
            {f"{RESULTS}/data/{k.model}/{k.task}/stats.json" for k in RUNS}
        ),
        analyses=analysis_records,
    output:
        html=report(
            config["report_path"],
            caption="../report/comparison.rst",
            category="Results",
        ),
    log:
        "logs/comparison_report.log",
    conda:
        "../../envs/peftlab.yaml"
    params:
        config=config,
    script:
        "../scripts/comparison_report.py"
