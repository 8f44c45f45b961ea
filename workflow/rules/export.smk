rule export:
    """A completed final run's standard artifacts (config export: all): a peft adapter folder,
    a merged transformers folder, or peftlab's own folder, each reloaded and checked."""
    input:
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
        weights=f"{RESULTS}/finetune/{RUN_DIR}/trainable.safetensors",
        record=f"{RESULTS}/finetune/{RUN_DIR}/result.json",
    output:
        directory(f"{RESULTS}/export/{RUN_DIR}"),
    log:
        f"logs/export/{RUN_DIR}.log",
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        model=lambda w: config["models"][w.model],
        code=code_of("export"),
    script:
        "../scripts/export.py"
