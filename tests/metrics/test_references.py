"""GM and gen-PPL under several reference LMs: each reference's numbers equal a run with that
reference alone, the first is primary, every reference has its columns, bad values are one line."""

import pytest
import torch

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.eval.scoring import flatten
from mdlm_dmmd.metrics.gen_ppl import gen_ppl_metric
from mdlm_dmmd.metrics.gradient_moment import gradient_moment_metric
from mdlm_dmmd.metrics.references import all_specs, label_of, reference_specs

from conftest import write_ar_checkpoint

DIGITS = {"name": "digits"}


@pytest.mark.parametrize("spec, label", [
    ("runs/ar_seed2/checkpoints/final.ckpt", "ar_seed2"),
    ("/x/y/step400.ckpt", "step400"),
    ("exports/ar small/", "ar_small"),
    ("gpt2-large", "gpt2-large"),
    ("openai-community/gpt2", "gpt2"),
])
def test_labels_come_from_the_spec(spec, label):
    assert label_of(spec) == label


def test_one_list_or_mapping_in_order():
    assert reference_specs("gpt2", "gen_ppl") == {"gpt2": "gpt2"}
    assert reference_specs(["a/checkpoints/final.ckpt", "gpt2"], "gen_ppl") == {"a": "a/checkpoints/final.ckpt",
                                                                                 "gpt2": "gpt2"}
    assert list(reference_specs({"z": "p1", "a": "p2"}, "gen_ppl")) == ["z", "a"]
    assert all_specs({"z": "p1", "a": "p2"}) == ["p1", "p2"] and all_specs(None) == []


@pytest.mark.parametrize("value, match", [
    ([], " must be a reference .* got \\[\\]"),
    (["gpt2", 3], "got \\['gpt2', 3\\]"),
    ({"a": ""}, "got \\{'a': ''\\}"),
    (7, "got 7"),
    (["r1/checkpoints/final.ckpt", "r2/final/checkpoints/x.ckpt", "x/r1/checkpoints/last.ckpt"],
     "share the column label 'r1'; name them with a mapping"),
])
def test_bad_reference_values_are_one_line_errors(value, match):
    with pytest.raises(UserError, match=f"^eval.metric_options.gradient_moment.reference.*{match}") as err:
        reference_specs(value, "gradient_moment")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def two_references(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    return (str(write_ar_checkpoint(root / "ar_a", vocab=17, length=64, seed=0)),
            str(write_ar_checkpoint(root / "ar_b", vocab=17, length=64, seed=1)))


def test_gm_under_two_references_equals_each_alone(two_references):
    a, b = two_references
    samples = torch.randint(0, 17, (8, 64), generator=torch.Generator().manual_seed(0))
    options = {"data_config": DIGITS, "batch_size": 2, "device": "cpu"}
    alone = {path: gradient_moment_metric(samples, reference=path, **options) for path in (a, b)}
    assert "columns" not in alone[a]  # one reference: the metric as before
    both = gradient_moment_metric(samples, reference=[b, a], **options)
    assert both["value"] == alone[b]["value"] and both["stderr"] == alone[b]["stderr"]  # the first is primary
    assert both["primary_reference"] == "ar_b" and both["reference"] == b
    assert alone[a]["value"] != alone[b]["value"]  # two judges that disagree in the numbers
    assert both["columns"] == {"gm_ar_b": alone[b]["value"], "gm_ar_b_stderr": alone[b]["stderr"],
                               "gm_ar_a": alone[a]["value"], "gm_ar_a_stderr": alone[a]["stderr"]}
    row = flatten({"gradient_moment": both})
    assert row["gradient_moment"] == alone[b]["value"] and row["gm_ar_a"] == alone[a]["value"]


def test_gen_ppl_under_a_labelled_mapping(two_references):
    a, b = two_references
    samples = torch.randint(0, 17, (5, 64), generator=torch.Generator().manual_seed(1))
    options = {"data_config": DIGITS, "batch_size": 2, "device": "cpu"}
    both = gen_ppl_metric(samples, reference={"first": a, "second": b}, **options)
    assert both["value"] == gen_ppl_metric(samples, reference=a, **options)["value"]
    assert both["columns"]["gen_ppl_second"] == gen_ppl_metric(samples, reference=b, **options)["value"]
    assert set(both["references"]) == {"first", "second"}
    assert all("per_sample" not in r for r in both["references"].values())
