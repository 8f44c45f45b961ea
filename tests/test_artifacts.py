"""Standard artifacts of a completed run (``peftlab.artifacts.export_run``, ``python -m peftlab
export``): every method's runs export to the forms users load, each reloaded the way a user
would (peft and transformers alone for the standard forms) and matching the run's logits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from _runs import train_run
from _workflow_copy import workflow_copy
from peftlab.artifacts import export_run, load_exported
from peftlab.errors import PeftlabError
from peftlab.methods import METHODS, build_method

PEFT_BACKED = {"lora", "dora", "ia3", "vera", "prompt_tuning"}


def _expected_forms(method: str) -> set[str]:
    forms = ({"peft"} if method in PEFT_BACKED else set()) | ({"merged"} if METHODS[method].mergeable else set())
    return forms or {"peftlab"}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_exports_forms_that_reload_to_the_runs_logits(method, minilm_spec, minilm_task, tmp_path, repo):
    run = train_run(repo, minilm_spec, minilm_task, tmp_path / "results", method)
    out = tmp_path / "export"
    manifest = export_run(run, minilm_spec, minilm_task, out)
    assert set(manifest["forms"]) == _expected_forms(method)
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(manifest))
    for form, entry in manifest["forms"].items():
        assert (out / entry["path"]).is_dir()
        assert entry["max_abs_logit_diff"] <= 1e-5, (form, entry)
    if "peft" in manifest["forms"]:
        config = json.loads((out / "peft" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == manifest["base"]["name_or_path"]
        assert "classifier" in config["modules_to_save"]  # the trained head travels with the adapter
    if "peftlab" in manifest["forms"]:  # reloads through peftlab, in a fresh model
        assert not METHODS[method].mergeable
        model = load_exported(out / "peftlab")
        assert build_method(method, manifest["method_params"]).name == method
        assert isinstance(model, torch.nn.Module)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
def test_standard_forms_load_without_peftlab(minilm_spec, minilm_task, tmp_path, repo):
    """The peft folder loads with peft and transformers alone, the merged folder with
    transformers alone, in a process where importing peftlab fails; both give the run's logits."""
    from peftlab.artifacts import _logits, _probe_batch
    from peftlab.models import load_model, load_tokenizer, resolve_model_path

    run = train_run(repo, minilm_spec, minilm_task, tmp_path / "results", "lora", steps=4, learning_rate=1e-2)
    out = tmp_path / "export"
    export_run(run, minilm_spec, minilm_task, out)
    batch = _probe_batch(minilm_task, {"problem_type": "single_label_classification", "kind": "classification"},
                         load_tokenizer(minilm_spec), 8)
    method = build_method("lora", json.loads((run / "result.json").read_text())["config"]["method_params"])
    trained = method.load(load_model(minilm_spec, 2, "single_label_classification", seed=0),
                          run / "trainable.safetensors").eval()
    reference = _logits(trained, batch)
    base = load_model(minilm_spec, 2, "single_label_classification", seed=1).eval()
    assert (_logits(base, batch) - reference).abs().max() > 1e-3  # the run moved the logits
    torch.save({"batch": batch, "reference": reference}, tmp_path / "probe.pt")
    script = f"""
import sys
sys.modules["peftlab"] = None  # importing peftlab fails in this process
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification as Auto
probe = torch.load({str(tmp_path / "probe.pt")!r})
base = Auto.from_pretrained({resolve_model_path(minilm_spec)!r}, num_labels=2)
models = {{"peft": PeftModel.from_pretrained(base, {str(out / "peft")!r}),
          "merged": Auto.from_pretrained({str(out / "merged")!r})}}
for name, model in models.items():
    with torch.no_grad():
        logits = model.eval()(**probe["batch"]).logits
    print(name, float((logits - probe["reference"]).abs().max()))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    diffs = dict(line.split() for line in res.stdout.split("\n") if line.startswith(("peft ", "merged ")))
    assert set(diffs) == {"peft", "merged"} and all(float(d) <= 1e-5 for d in diffs.values()), diffs


def test_a_run_that_did_not_complete_is_not_exported(minilm_spec, minilm_task, tmp_path):
    run = tmp_path / "results" / "finetune" / "minilm-l6" / "rotten_tomatoes" / "lora" / "default" / "seed0"
    with pytest.raises(PeftlabError, match="holds no finetune run"):
        export_run(run, minilm_spec, minilm_task, tmp_path / "out")
    run.mkdir(parents=True)
    (run / "trainable.safetensors").write_bytes(b"")
    (run / "result.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(PeftlabError, match="did not complete"):
        export_run(run, minilm_spec, minilm_task, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_a_causal_lm_exports_and_reloads(method, smollm, tmp_path_factory, tmp_path, repo):
    """SmolLM2 on a generation task: LoRA's peft folder and merged folder, LoReFT's peftlab
    folder, each reloaded and matching the run's logits over the 49k-token vocabulary."""
    from peftlab.data import TaskSpec, prepare_task

    spec, tok = smollm
    data = tmp_path_factory.mktemp("gen") / "asdiv"
    prepare_task(TaskSpec.from_config("asdiv", {"max_train_examples": 8, "max_eval_examples": 4}), tok, data,
                 "smollm2-135m")
    run = train_run(repo, spec, data, tmp_path / "results", method, batch_size=4, eval_batch_size=4, evals_per_epoch=1)
    manifest = export_run(run, spec, data, tmp_path / "export")
    assert set(manifest["forms"]) == _expected_forms(method)
    diffs = {form: entry["max_abs_logit_diff"] for form, entry in manifest["forms"].items()}
    assert diffs.get("peft", 0) <= 1e-5 and diffs.get("peftlab", 0) <= 1e-5, diffs
    assert diffs.get("merged", 0) <= 1e-3, diffs  # a merge reorders sums: fp32 rounding over 30 layers
    if method == "lora":
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged")
        assert type(merged).__name__ == "LlamaForCausalLM"


@pytest.mark.slow
def test_the_export_rule_exports_a_final_run_of_the_pipeline(tmp_path):
    """``export: all``: the DAG gets one export job per final run, and a job writes the run's
    checked forms (here LoRA's peft and merged folders) where the README says."""
    work = workflow_copy(tmp_path)
    # targets before --configfile and --config, which take every word after them
    options = ["-c1", "--configfile", "tests/configs/tiny.yaml", "--config", "export=all"]
    snakemake = [sys.executable, "-m", "snakemake"]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    dry = subprocess.run([*snakemake, "-n", *options], cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert re.search(r"^export\s+6$", dry.stdout, flags=re.M), dry.stdout[-2000:]  # 3 methods x 2 seeds
    target = "results/export/minilm-l6/rotten_tomatoes/lora/default/seed0"
    res = subprocess.run([*snakemake, target, *options], cwd=work, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((work / target / "export.json").read_text())
    assert set(manifest["forms"]) == {"peft", "merged"}
    assert all(entry["max_abs_logit_diff"] <= 1e-5 for entry in manifest["forms"].values()), manifest["forms"]
    assert (work / target / "peft" / "adapter_model.safetensors").exists()
    assert (work / target / "merged" / "config.json").exists()


@pytest.mark.slow
def test_the_export_command(minilm_spec, minilm_task, tmp_path, repo, capsys):
    """``python -m peftlab export <run folder>`` with the pipeline's config: the forms land under
    results/export/<run>, each named with its check; a folder that is no run is a one-line error."""
    import yaml

    from peftlab.__main__ import main

    results = tmp_path / "results"
    shutil.copytree(minilm_task, results / "data" / "minilm-l6" / "rotten_tomatoes")
    run = train_run(repo, minilm_spec, minilm_task, results, "bitfit")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"minilm-l6": {}}, "tasks": {"rotten_tomatoes": {}}, "methods": {"bitfit": ["default"]}, "seeds": [0],
        "results_dir": str(results), "experiments_dir": str(repo / "config" / "experiments")}))
    assert main(["export", str(run), "--configfile", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{results}/export/minilm-l6/rotten_tomatoes/bitfit/default/seed0/merged: merged form")
    assert (results / "export" / "minilm-l6" / "rotten_tomatoes" / "bitfit" / "default" / "seed0" / "export.json").exists()
    assert main(["export", str(run.parent), "--configfile", str(config)]) == 1
    assert "is not a run: give its folder" in capsys.readouterr().err


def test_the_export_rule_on_a_failed_run_writes_why_and_goes_on(minilm_spec, minilm_task, tmp_path):
    from peftlab.artifacts import export_stage

    run = tmp_path / "seed0"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"status": "failed", "run": {"method": "lora"},
                                                 "failure": {"reason": "non-finite loss", "step": 3}}))
    manifest = export_stage(run, minilm_spec, minilm_task, tmp_path / "out")
    assert manifest["forms"] == {} and "non-finite loss" in manifest["not_exported"]
    assert json.loads((tmp_path / "out" / "export.json").read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export.json"]
