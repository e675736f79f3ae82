"""The per-matrix rule (measure -> decide -> combine) and its mergekit binding: decisions,
records, candidates, roles, bad tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import oracle_rho
from mergekit.merge_methods import TensorGroup

from mergekit_safemerge.binding.method import SAFEMERGE
from mergekit_safemerge.binding.passes import MergePass, running
from mergekit_safemerge.core.records import KEPT, MERGED
from mergekit_safemerge.core.rule import RuleSettings, all_finite, apply_rule
from mergekit_safemerge.core.targets import is_candidate, matches_targets, parse_targets
from mergekit_safemerge.errors import SafeMergeError

IDS = ("aligned", "unaligned", "finetuned", "safety")
ROLE = {"unaligned": "unaligned", "finetuned": "finetuned", "safety": "safety"}


def _matrices(shape=(12, 20), seed=0, rank=2):
    g = torch.Generator().manual_seed(seed)
    unaligned = torch.randn(shape, generator=g)
    aligned = unaligned + 0.1 * torch.randn(shape, generator=g)
    delta = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    finetuned = aligned + 0.01 * delta
    safety = aligned + 0.01 * torch.randn(shape, generator=g)
    return {"aligned": aligned, "unaligned": unaligned, "finetuned": finetuned, "safety": safety}


def _group(tensors, name="model.layers.0.self_attn.q_proj.weight", vocabulary_axis=None, ids=IDS):
    return TensorGroup.from_tensors(
        [tensors[i] for i in IDS], ids=ids, base_index=0, name=name, vocabulary_axis=vocabulary_axis
    )


def _run(group, **parameters):
    defaults = {"role": ROLE, "threshold": 0.35, "safety_weight": 0.2}
    (result,) = SAFEMERGE([group], parameters={**defaults, **parameters})
    return result


def _decide(m, threshold, name="w", **settings):
    """The rule on the four roles of ``m`` with the paper's safety weight 0.2:
    ``(output or None when kept, record)``."""
    result = apply_rule(
        name, m["aligned"], m["unaligned"], m["finetuned"] - m["aligned"],
        m["safety"] - m["aligned"],
        RuleSettings(threshold=threshold, safety_weight=0.2, **settings),
    )  # fmt: skip
    return result.output, result.record


def _rho(m):
    return oracle_rho(
        m["finetuned"].double() - m["aligned"].double(),
        m["aligned"].double() - m["unaligned"].double(),
    )


def test_threshold_just_above_and_below_rho():
    m = _matrices()
    rho = _rho(m)
    merged, rec = _decide(m, rho + 1e-4)
    assert rec.decision == MERGED and rec.rho == pytest.approx(rho, rel=1e-5)
    expected = (
        m["aligned"] + 0.8 * (m["finetuned"] - m["aligned"]) + 0.2 * (m["safety"] - m["aligned"])
    )
    assert torch.allclose(merged, expected, atol=1e-6)
    kept, rec = _decide(m, rho - 1e-4)
    assert rec.decision == KEPT and kept is None


def test_strict_inequality_at_rho_equal_threshold():
    m = _matrices()
    rho = _decide(m, 0.0)[1].rho
    _, rec = _decide(m, rho)
    assert rec.decision == KEPT


def test_zero_update_keeps_the_matrix():
    m = _matrices()
    m["finetuned"] = m["aligned"].clone()
    out, rec = _decide(m, 1.0)
    assert out is None and rec.decision == KEPT and rec.rho is None
    assert rec.reason.startswith("D = 0")


def test_zero_alignment_gives_rho_zero_and_is_recorded():
    m = _matrices()
    m["unaligned"] = m["aligned"].clone()
    _, rec = _decide(m, 0.35)
    assert rec.rho == 0.0 and rec.alignment_norm == 0.0 and rec.decision == MERGED
    assert rec.reason.startswith("V = 0")
    _, rec = _decide(m, 0.0)
    assert rec.decision == KEPT


def test_record_fields_match_oracle():
    m = _matrices(seed=3)
    d = m["finetuned"] - m["aligned"]
    s = m["safety"] - m["aligned"]
    v = m["aligned"] - m["unaligned"]
    _, rec = _decide(m, 0.5, name="x.weight")
    assert rec.shape == (12, 20)
    assert rec.delta_norm == pytest.approx(float(d.norm()), rel=1e-5)
    assert rec.safety_norm == pytest.approx(float(s.norm()), rel=1e-5)
    assert rec.alignment_norm == pytest.approx(float(v.norm()), rel=1e-5)
    cos = float((d.double() * s.double()).sum() / (d.double().norm() * s.double().norm()))
    assert rec.delta_safety_cosine == pytest.approx(cos, rel=1e-4, abs=1e-6)


def test_record_carries_every_applied_value():
    _, rec = _decide(_matrices(), 0.6, combine="ties", density=0.4, select="threshold")
    assert (rec.threshold, rec.safety_weight, rec.combine, rec.density, rec.select) == (
        0.6, 0.2, "ties", 0.4, "threshold",
    )  # fmt: skip


def test_measuring_output_merges_nothing():
    m = _matrices()
    result = apply_rule(
        "w", m["aligned"], m["unaligned"], m["finetuned"] - m["aligned"],
        m["safety"] - m["aligned"], RuleSettings(threshold=1.0, safety_weight=0.2),
        output="none",
    )  # fmt: skip
    assert result.output is None and result.record.decision == MERGED


def test_targets_and_candidates():
    assert parse_targets(" q_proj, v_proj ,") == ("q_proj", "v_proj")
    assert parse_targets("") == ()
    with pytest.raises(SafeMergeError, match="targets"):
        parse_targets("q_proj;v_proj")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert matches_targets(name, ("q_proj",))
    assert matches_targets(name, ("self_attn.q_proj",))
    assert not matches_targets(name, ("proj",))
    assert not matches_targets("model.layers.0.self_attn.k_proj.weight", ("q_proj", "v_proj"))
    assert is_candidate(name, 2, None, ())
    assert not is_candidate(name, 1, None, ())
    assert not is_candidate("model.embed_tokens.weight", 2, 0, ())


def test_group_flow_merges_only_candidates():
    m = _matrices()
    with running(MergePass()) as session:
        merged = _run(_group(m), threshold=1.0)
        outside = _run(
            _group(m, name="model.layers.0.self_attn.k_proj.weight"),
            threshold=1.0,
            targets="q_proj",
        )
        vocab = _run(_group(m, name="model.embed_tokens.weight", vocabulary_axis=0), threshold=1.0)
        bias = _run(
            _group({k: t[0] for k, t in m.items()}, name="model.layers.0.q_proj.bias"),
            threshold=1.0,
        )
    assert not torch.equal(merged, m["finetuned"])
    for result, source in (
        (outside, m["finetuned"]),
        (vocab, m["finetuned"]),
        (bias, m["finetuned"][0]),
    ):
        assert torch.equal(result, source)
    assert [r.name for r in session.records] == ["model.layers.0.self_attn.q_proj.weight"]


def test_output_keeps_input_dtype():
    m = {k: t.to(torch.bfloat16) for k, t in _matrices().items()}
    (result,) = SAFEMERGE(
        [_group(m)],
        parameters={"role": ROLE, "threshold": 1.0, "safety_weight": 0.2},
        dtype=torch.bfloat16,
    )
    assert result.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", ["unaligned", "finetuned", "safety", "aligned"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_candidate_names_tensor_and_model(bad, value):
    m = _matrices()
    m[bad] = m[bad].clone()
    m[bad][1, 2] = value
    with pytest.raises(SafeMergeError, match=rf"q_proj.weight of model {bad} \({bad}\)"):
        _run(_group(m))


def test_duplicate_role_in_group():
    m = _matrices()
    with pytest.raises(SafeMergeError, match="role 'safety' is already given to model unaligned"):
        _run(_group(m), role={"unaligned": "safety", "finetuned": "finetuned", "safety": "safety"})


def test_dare_linear_is_per_tensor_deterministic_whatever_the_order():
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)]
    inputs = {name: _matrices(seed=i) for i, name in enumerate(names)}

    def run(order):
        torch.manual_seed(1234)  # what mergekit's --random-seed does
        return {
            n: _run(_group(inputs[n], name=n), threshold=1.0, combine="dare_linear", density=0.5)
            for n in order
        }

    forward, backward = run(names), run(names[::-1])
    for name in names:
        assert torch.equal(forward[name], backward[name])
    torch.manual_seed(99)
    other = _run(
        _group(inputs[names[0]], name=names[0]), threshold=1.0, combine="dare_linear", density=0.5
    )
    assert not torch.equal(other, forward[names[0]])


@pytest.mark.parametrize("combine", ["dare_linear", "ties"])
def test_unselected_matrices_are_never_sparsified(combine):
    m = _matrices()
    result = _run(_group(m), threshold=0.0, combine=combine, density=0.3)
    assert torch.equal(result, m["finetuned"])


@pytest.mark.parametrize(
    ("name", "axis", "targets"),
    [
        ("model.embed_tokens.weight", 0, ""),
        ("model.layers.0.mlp.up_proj.weight", None, "q_proj"),
        ("model.norm.weight", None, ""),
    ],
)
def test_non_finite_outside_the_candidates_stops_the_run(name, axis, targets):
    m = _matrices()
    if name.endswith("norm.weight"):
        m = {k: t[0].clone() for k, t in m.items()}
    m["finetuned"] = m["finetuned"].clone()
    m["finetuned"].view(-1)[3] = float("nan")
    with pytest.raises(SafeMergeError, match=rf"tensor {name} of model finetuned"):
        _run(_group(m, name=name, vocabulary_axis=axis), targets=targets)
    # a NaN in a role whose tensor is not used (the unaligned embedding) changes nothing
    m = _matrices()
    m["unaligned"] = m["unaligned"].clone()
    m["unaligned"][0, 0] = float("nan")
    vocab = _run(_group(m, name="model.embed_tokens.weight", vocabulary_axis=0))
    assert torch.equal(vocab, m["finetuned"])


@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"])
def test_the_binding_never_modifies_its_inputs(threshold, name, tiny_roles, lora_adapters):
    """mergekit may hand one loaded tensor to several tasks: inputs must come back untouched."""
    m = _matrices(shape=(64, 64))
    if name.endswith("norm.weight"):
        m = {k: t[0].clone() for k, t in m.items()}
    inputs = {k: t.clone() for k, t in m.items()}
    _run(_group(m, name=name), threshold=threshold, combine="linear")
    assert all(torch.equal(m[k], inputs[k]) for k in m)
    # with the fine-tune as an adapter, the aligned weight plus s B A is formed out of place
    ids = ("aligned", "unaligned", "safety")
    group = TensorGroup.from_tensors(
        [m[i] for i in ids], ids=ids, base_index=0, name=name, vocabulary_axis=None
    )
    parameters = {
        "role": {"unaligned": "unaligned", "safety": "safety"},
        "threshold": threshold,
        "safety_weight": 0.2,
        "finetuned_adapter": lora_adapters["finetuned"],
    }
    if m["aligned"].ndim == 2:
        SAFEMERGE([group], parameters=parameters)
        assert all(torch.equal(m[k], inputs[k]) for k in m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite_everywhere(dtype):
    """One bad entry anywhere (every lane of a vector register, across thread chunks), any
    dtype: the one-pass check agrees with ``isfinite(t).all()``; large finite values whose sum
    overflows are finite."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(257, 129, generator=generator).to(dtype)
    assert all_finite(clean)
    positions = [*range(70), *torch.randint(0, clean.numel(), (60,), generator=generator).tolist()]
    for bad in (float("nan"), float("inf"), float("-inf")):
        for position in positions:
            tensor = clean.clone().view(-1)
            tensor[position] = bad
            assert not all_finite(tensor.view(clean.shape)), (bad, position)
            assert bool(torch.isfinite(tensor).all()) is False
    large = torch.zeros(1 << 22, dtype=dtype)  # split across threads
    for position in (0, (1 << 21) + 7, (1 << 22) - 1):
        large[position] = float("nan")
        assert not all_finite(large)
        large[position] = 0.0
    huge = torch.full((4096,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert all_finite(huge) and not bool(torch.isfinite(huge.sum()))
    assert all_finite(torch.empty(0, 3, dtype=dtype))
    assert all_finite(torch.tensor([1, 2], dtype=torch.int32))
