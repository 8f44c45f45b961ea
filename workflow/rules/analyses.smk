rule gradient_sparsity:
    """Gradient statistics at the pretrained point for one (model, task); SIFT masks."""
    input:
        train=f"{RESULTS}/data/{{model}}/{{task}}/train.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
    output:
        record=f"{RESULTS}/analyses/{{model}}/{{task}}/gradient_sparsity/sparsity.json",
        modules=f"{RESULTS}/analyses/{{model}}/{{task}}/gradient_sparsity/modules.csv",
        masks=[
            f"{RESULTS}/analyses/{{model}}/{{task}}/gradient_sparsity/sift_mask_{v}.safetensors"
            for v in SIFT_ANALYSIS
        ],
    log:
        "logs/gradient_sparsity/{model}/{task}.log",
    benchmark:
        "benchmarks/gradient_sparsity/{model}/{task}.tsv"
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 60 * attempt,
        gpu=1,
    params:
        model=lambda w: config["models"][w.model],
        settings=config["analyses"]["gradient_sparsity"],
        sift_variants=SIFT_ANALYSIS,
        mlflow=MLFLOW,
        code=code_of("gradient_sparsity"),
    script:
        "../scripts/gradient_sparsity.py"


rule intrinsic_dimension:
    """Random-subspace (SAID/DID) training of one d for one (model, task, seed)."""
    input:
        train=f"{RESULTS}/data/{{model}}/{{task}}/train.parquet",
        validation=f"{RESULTS}/data/{{model}}/{{task}}/validation.parquet",
        test=f"{RESULTS}/data/{{model}}/{{task}}/test.parquet",
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
    output:
        record=f"{RESULTS}/analyses/{{model}}/{{task}}/intrinsic_dimension/d{{d}}/seed{{seed}}/result.json",
    log:
        "logs/intrinsic_dimension/{model}/{task}/d{d}/seed{seed}.log",
    benchmark:
        "benchmarks/intrinsic_dimension/{model}/{task}/d{d}/seed{seed}.tsv"
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 120 * attempt,
        gpu=1,
    params:
        model=lambda w: config["models"][w.model],
        settings=ID,
        training=ID_TRAINING,
        mlflow=MLFLOW,
        code=code_of("intrinsic_dimension"),
    script:
        "../scripts/intrinsic_dimension.py"


rule d90:
    """d90: the smallest d reaching the configured fraction of full fine-tuning's test score."""
    input:
        records=lambda w: [
            f"{RESULTS}/analyses/{w.model}/{w.task}/intrinsic_dimension/d{d}/seed{s}/result.json"
            for d in ID["dims"]
            for s in ID["seeds"]
        ],
        reference=lambda w: [
            f"{RESULTS}/evaluate/{w.model}/{w.task}/full/{ID['reference']}/seed{s}/metrics.json"
            for s in config["seeds"]
        ],
        # their training records: d90.json states the reference's budget beside the grid's
        reference_runs=lambda w: [
            f"{RESULTS}/finetune/{w.model}/{w.task}/full/{ID['reference']}/seed{s}/result.json"
            for s in config["seeds"]
        ],
        stats=f"{RESULTS}/data/{{model}}/{{task}}/stats.json",
    output:
        record=f"{RESULTS}/analyses/{{model}}/{{task}}/intrinsic_dimension/d90.json",
    log:
        "logs/d90/{model}/{task}.log",
    conda:
        "../../envs/peftlab.yaml"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=lambda wildcards, attempt: 240 * attempt,
        gpu=1,
    params:
        model=lambda w: config["models"][w.model],
        settings=ID,
        training=ID_TRAINING,
        mlflow=MLFLOW,
        code=code_of("d90"),
    script:
        "../scripts/d90.py"
