rule gift_view:
    """GIFT's first projection on the tokens of a few test sentences, clustered (report view)."""
    input:
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        records=gift_run_records,
        weights=gift_run_weights,
    output:
        record=f"{RESULTS}/analyses/{{model}}/{{task}}/gift_tokens.json",
    log:
        "logs/gift_view/{model}/{task}.log",
    conda:
        "../../envs/peftlab.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    params:
        model=lambda w: config["models"][w.model],
        code=code_of("gift_view"),
    script:
        "../scripts/gift_view.py"


rule aggregate:
    """Join every run's training record and test metrics into one table (failed runs kept
    with their reason); sync MLflow records queued while the store was unreachable."""
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
    params:
        mlflow=MLFLOW,
        code=code_of("aggregate"),
    script:
        "../scripts/aggregate.py"


rule comparison_report:
    """The self-contained HTML comparison report users read (figures also as PNG files)."""
    input:
        summary=f"{RESULTS}/summary.parquet",
        finetune=all_finetune_records,
        # every test example's prediction: the intervals and paired comparisons
        predictions=lambda w: [
            run_path("evaluate", k, "predictions.jsonl") for k in RUNS
        ],
        stats=lambda w: sorted(
            {f"{RESULTS}/data/{k.model}/{k.task}/stats.json" for k in RUNS}
        ),
        analyses=analysis_records,
        gift=gift_view_records,
        # the tuning stage's selections (none when nothing is tuned)
        tuning=all_selections,
    output:
        html=report(
            config["report_path"],
            caption="../report/comparison.rst",
            category="Results",
        ),
        figures=report(
            directory(REPORT_FIGURES),
            patterns=["{name}.png"],
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{name}"},
        ),
    log:
        "logs/comparison_report.log",
    conda:
        "../../envs/peftlab.yaml"
    params:
        config=config,
        mlflow=MLFLOW_REPORT,
        code=code_of("comparison_report"),
    script:
        "../scripts/comparison_report.py"
