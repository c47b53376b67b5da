"""Per-step pod resources (k8s.resources): defaults that follow the task family (a causal LM's
evaluate gets a GPU), overrides per step that render valid pods, and settings a node pool can
never hold refused by `finetune render`, naming the setting."""

import json

import pytest

from pipeline import cli, steps
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.manifests import restricted_violations, validate_core


def _pod(step, *sets):
    manifest = steps.render(step, ["run_id=r", *sets], "kubernetes")
    validate_core(manifest)
    assert restricted_violations(manifest["spec"]) == []
    return manifest["spec"]


def test_a_causal_lms_evaluate_gets_a_gpu_and_a_classifiers_does_not():
    lm = _pod("evaluate", "task=causal-lm")
    limits = lm["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and limits["memory"] == "16Gi"
    assert "step-cuda" in lm["containers"][0]["image"] and lm["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    classifier = _pod("evaluate")
    assert "nvidia.com/gpu" not in classifier["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in classifier and "step-cpu" in classifier["containers"][0]["image"]


def test_each_step_can_have_its_own_cpu_memory_gpus_node_selector_and_tolerations():
    resources = {
        "validate": {
            "cpu": "4",
            "memory": "32Gi",
            "node_selector": ["pool=highmem"],
            "tolerations": ["highmem=true:NoSchedule"],
        },
        "register": {"cpu": "500m"},
    }
    spec = _pod("validate", f"k8s.resources={json.dumps(resources)}")
    assert spec["containers"][0]["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}
    assert spec["nodeSelector"] == {"pool": "highmem"}
    assert spec["tolerations"] == [{"key": "highmem", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    assert (
        _pod("register", f"k8s.resources={json.dumps(resources)}")["containers"][0]["resources"]["limits"]["cpu"]
        == "500m"
    )
    assert (
        _pod("collect", f"k8s.resources={json.dumps(resources)}")["containers"][0]["resources"]["limits"]["cpu"] == "1"
    )


@pytest.mark.parametrize(
    "resources, says",
    [
        (
            {"evaluate": {"gpus": 16}},
            "k8s.resources.evaluate.gpus: 16 GPUs per pod cannot be scheduled on a node pool of 8",
        ),
        ({"train": {"gpus": 2}}, "k8s.resources.train.gpus: train's GPUs per pod are train.num_processes"),
        ({"evalute": {"cpu": "2"}}, "k8s.resources.evalute: no step 'evalute'"),
        ({"validate": {"ram": "8Gi"}}, "k8s.resources.validate.ram: unknown"),
        ({"validate": {"memory": "lots"}}, "k8s.resources.validate.memory: 'lots' is not a Kubernetes quantity"),
    ],
)
def test_what_a_node_pool_cannot_hold_is_refused_naming_the_setting(resources, says, capsys):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [f"k8s.resources={json.dumps(resources)}"])
    assert (
        cli.main(
            [
                "render",
                "--step",
                "evaluate",
                "--launcher",
                "kubernetes",
                "--set",
                f"k8s.resources={json.dumps(resources)}",
            ]
        )
        == 2
    )
    assert says in capsys.readouterr().err
