"""Checkpoints and the meta device, in one process: wrap a model built on the meta device, fill it
from the unwrapped model's state dict or safetensors, push updated logical weights after
rebalances, refuse bad sources without changing anything, and prove per-expert tensors on a probe
(the layouts that a guess from leading dimensions gets wrong)."""

from __future__ import annotations

import copy
import json
import warnings

import moe_models as mm
import odd_experts as odd
import pytest
import torch
from checkpoints import save_sharded, updated
from safetensors.torch import save_file, save_model

from eplb import EPLBConfig, EPLBError, EPLBWrapper, Placement, meta_parameters
from eplb.moe import find_moe_layers

warnings.filterwarnings("ignore", category=UserWarning)

SYNC = dict(use_async=False, step_interval=10_000)


def _build(kind: str, seed: int = 0):
    if kind == "moe":
        return mm.build_reference_model(seed)
    if kind == "module_list":
        return mm.build_module_list_model(seed)
    if kind in ("shared_rows", "float8"):
        return odd.build_odd_model(kind, seed)
    return mm.build_transformers(kind, seed=seed)


def _build_meta(kind: str):
    with meta_parameters():
        return _build(kind)


def _batch(kind: str, seed: int):
    return mm.token_batch(seed) if kind in mm.TRANSFORMERS_MODELS else mm.hidden_batch(seed)


def _out(kind, model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if kind in mm.TRANSFORMERS_MODELS else out


def _assert_equal_outputs(kind, wrapper, reference, seeds=(11, 12)):
    for seed in seeds:
        x = _batch(kind, seed)
        torch.testing.assert_close(_out(kind, wrapper, x), _out(kind, reference, x))


def _permuted_placement(num_layers: int, E: int = mm.NUM_EXPERTS, P: int = 12) -> Placement:
    """Every expert away from its home slot, four of them twice."""
    gen = torch.Generator().manual_seed(5)
    rows = [
        torch.cat([torch.randperm(E, generator=gen), torch.randperm(E, generator=gen)[: P - E]])
        for _ in range(num_layers)
    ]
    return Placement.from_phy2log(torch.stack(rows), E)


def _snapshot(wrapper) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in wrapper.module.state_dict().items()}


def _assert_unchanged(wrapper, before):
    after = wrapper.module.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before)


# ------------------------------------------------------------------------------ meta device
@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3", "moe", "module_list"])
@pytest.mark.parametrize("source_kind", ["state_dict", "file", "folder_with_index"])
def test_meta_model_loaded_from_a_checkpoint_equals_the_full_model(kind, source_kind, tmp_path):
    full = _build(kind)
    if source_kind == "state_dict":
        source = full.state_dict()
    elif source_kind == "file":
        source = tmp_path / "model.safetensors"
        save_model(full, str(source))
    else:
        source = save_sharded(full, tmp_path)
    model = _build_meta(kind)
    num_layers = len(find_moe_layers(model))
    wrapper = EPLBWrapper(
        model, EPLBConfig(num_redundant_experts=4, **SYNC), device="cpu",
        initial_placement=_permuted_placement(num_layers),
    )
    assert all(t.device.type == "cpu" for t in wrapper.module.state_dict().values())
    report = wrapper.load_logical_state_dict(source)
    assert report.keys == len(full.state_dict()) - _tied_duplicates(full)
    assert report.in_flight == "none"
    _assert_equal_outputs(kind, wrapper, full)
    wrapper.rebalance()
    _assert_equal_outputs(kind, wrapper, full)


def _tied_duplicates(model) -> int:
    state = model.state_dict()
    return len(state) - len({id(t) for t in state.values()})


def test_meta_model_without_device_is_refused():
    with pytest.raises(EPLBError, match=r"meta device and device is None: pass device="):
        EPLBWrapper(_build_meta("moe"), EPLBConfig(**SYNC))


def test_device_that_contradicts_real_experts_is_refused():
    with pytest.raises(EPLBError, match=r"device \(meta\) differs from the device of the experts \(cpu\)"):
        EPLBWrapper(_build("moe"), EPLBConfig(**SYNC), device="meta")


def test_meta_buffers_without_a_checkpoint_are_refused():
    with torch.device("meta"):
        model = mm.build_transformers("qwen3_moe")  # rotary inv_freq: a non-persistent meta buffer
    with pytest.raises(EPLBError, match=r"non-persistent buffers .*inv_freq.*eplb.meta_parameters"):
        EPLBWrapper(model, EPLBConfig(**SYNC), device="cpu")


def test_meta_parameters_puts_parameters_on_meta_and_keeps_buffers():
    model = _build_meta("qwen3_moe")
    assert all(p.device.type == "meta" for p in model.parameters())
    full = _build("qwen3_moe")
    buffers = dict(full.named_buffers())
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name])


def test_forward_before_loading_raises_and_partial_loads_count():
    full = _build("moe")
    wrapper = EPLBWrapper(_build_meta("moe"), EPLBConfig(**SYNC), device="cpu")
    x = mm.hidden_batch(0)
    with pytest.raises(EPLBError, match=r"hold no weights yet .*load_logical_state_dict"):
        wrapper(x)
    state = full.state_dict()
    experts = {k: v for k, v in state.items() if "experts" in k}
    wrapper.load_logical_state_dict(experts, strict=False)
    with pytest.raises(EPLBError, match=r"2 of its tensors hold no weights yet .*gate"):
        wrapper(x)
    wrapper.load_logical_state_dict({k: v for k, v in state.items() if k not in experts}, strict=False)
    torch.testing.assert_close(_out("moe", wrapper, x), _out("moe", full, x))


def test_expert_memory_is_the_slots_only():
    full = _build("qwen3_moe")
    wrapper = EPLBWrapper(_build_meta("qwen3_moe"), EPLBConfig(num_redundant_experts=4, **SYNC), device="cpu")
    slot_bytes = sum(
        t.numel() * t.element_size() for layer in wrapper.eplb_layers for t in layer.slot_tensors().values()
    )
    expert_bytes = sum(
        getattr(spec.experts, n).numel() * getattr(spec.experts, n).element_size()
        for spec in find_moe_layers(full)
        for n in spec.expert_tensors
    )
    assert slot_bytes * mm.NUM_EXPERTS == expert_bytes * 12  # S / E of the experts, with S = P = 12
    assert not any(t.device.type == "meta" for t in wrapper.module.parameters())


# ------------------------------------------------------------------------------ weight sync
@pytest.mark.parametrize("kind", ["qwen3_moe", "module_list", "float8"])
def test_load_after_rebalances_with_redundancy_equals_the_updated_model(kind):
    model = _build(kind)
    reference = copy.deepcopy(model)
    config = EPLBConfig(num_redundant_experts=4, policy=mm.register_shuffle_policy(), **SYNC)
    wrapper = EPLBWrapper(model, config)
    for seed in range(3):
        _out(kind, wrapper, _batch(kind, seed))
        assert not wrapper.rebalance().skipped
    assert int(wrapper.placement.logcnt.max()) > 1
    for version in (1, 2):
        reference = updated(reference, seed=version)
        report = wrapper.load_logical_state_dict(reference.state_dict())
        layers = wrapper.eplb_layers
        assert report.slots_written == sum(len(layer.slot_tensors()) * layer.slots_per_rank for layer in layers)
        _assert_equal_outputs(kind, wrapper, reference)
        _out(kind, wrapper, _batch(kind, 40 + version))
        wrapper.rebalance()
        _assert_equal_outputs(kind, wrapper, reference)
    restored = wrapper.unwrap()
    ours, theirs = restored.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8)) for k in theirs)


def test_load_while_an_async_rebalance_is_in_flight_waits_for_it():
    model = _build("moe")
    reference = updated(model, seed=3)
    config = EPLBConfig(num_redundant_experts=4, use_async=True, step_interval=10_000)
    with EPLBWrapper(model, config) as wrapper:
        _out("moe", wrapper, mm.hidden_batch(0))
        assert wrapper.rebalance() is None and wrapper.async_in_flight
        report = wrapper.load_logical_state_dict(reference.state_dict())
        assert report.in_flight == "waited"
        assert not wrapper.async_in_flight and wrapper.stats()["num_rebalances"] == 1
        _assert_equal_outputs("moe", wrapper, reference)


# ------------------------------------------------------------------------------ bad sources
def _bad_sources(full, tmp_path):
    state = full.state_dict()
    key = "blocks.0.experts.gate_up_proj"
    wrong_shape = dict(state, **{key: state[key][:-1]})
    wrong_dtype = dict(state, **{key: state[key].double()})
    extra = dict(state, **{"blocks.0.unknown": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "blocks.1.gate.weight"}
    not_tensor = dict(state, **{key: [1, 2]})
    text = tmp_path / "weights.bin"
    text.write_bytes(b"\0" * 8)
    bad_index = tmp_path / "bad"
    bad_index.mkdir()
    index = {"weight_map": {key: "absent.safetensors"}}
    (bad_index / "model.safetensors.index.json").write_text(json.dumps(index))
    return [
        (wrong_shape, r"'blocks.0.experts.gate_up_proj' is \[7, 96, 32\] torch.float32 in the source but \[8, "),
        (wrong_dtype, r"gate_up_proj' is \[8, 96, 32\] torch.float64 in the source but \[8, 96, 32\] torch.float32"),
        (extra, r"1 unexpected keys, e.g. \['blocks.0.unknown'\]"),
        (missing, r"1 missing keys, e.g. \['blocks.1.gate.weight'\]"),
        (not_tensor, r"maps str keys to tensors"),
        (str(text), r"is not a .safetensors file"),
        (str(tmp_path / "absent"), r"does not exist"),
        (str(bad_index), r"names missing files"),
        (42, r"source must be a state dict"),
    ]


def test_bad_sources_change_nothing(tmp_path):
    full = updated(_build("moe"), seed=1)
    wrapper = EPLBWrapper(_build("moe"), EPLBConfig(num_redundant_experts=4, **SYNC))
    before = _snapshot(wrapper)
    for source, message in _bad_sources(full, tmp_path):
        with pytest.raises(EPLBError, match=message):
            wrapper.load_logical_state_dict(source)
        _assert_unchanged(wrapper, before)
    # The same source loads once it is right, and a wrong dtype in a safetensors file is caught
    # from its header.
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.half() for k, v in full.state_dict().items()}, str(path))
    with pytest.raises(EPLBError, match=r"torch.float16 in the source but .* torch.float32"):
        wrapper.load_logical_state_dict(path)
    _assert_unchanged(wrapper, before)
    wrapper.load_logical_state_dict(full.state_dict())
    _assert_equal_outputs("moe", wrapper, full)


def test_model_load_state_dict_with_logical_keys_is_refused_before_anything_changes():
    """The RL weight-sync mistake: nn.Module.load_state_dict on the wrapped model with the unwrapped
    model's keys used to copy the routers and then fail on the expert keys."""
    full = updated(_build("qwen3_moe"), seed=2)
    wrapper = EPLBWrapper(_build("qwen3_moe"), EPLBConfig(num_redundant_experts=4, **SYNC))
    before = _snapshot(wrapper)
    for strict in (True, False):
        with pytest.raises(EPLBError, match=r"unwrapped model's expert keys .*load_logical_state_dict"):
            wrapper.module.load_state_dict(full.state_dict(), strict=strict)
        _assert_unchanged(wrapper, before)
    with pytest.raises(EPLBError, match=r"not an EPLBWrapper state_dict .*load_logical_state_dict"):
        wrapper.load_state_dict(full.state_dict())
    _assert_unchanged(wrapper, before)
    # The wrapped model's own state dict still round-trips through nn.Module.load_state_dict.
    wrapper.module.load_state_dict(wrapper.module.state_dict())
    wrapper.load_logical_state_dict(full.state_dict())
    _assert_equal_outputs("qwen3_moe", wrapper, full)
    # After unwrap the model takes logical keys again.
    wrapper.unwrap().load_state_dict(full.state_dict())


# ------------------------------------------------------------------------------ probe
def test_plain_attribute_per_expert_weight_is_refused():
    model = odd.build_odd_model("plain_attribute")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(EPLBError, match=r"blocks.0.experts.*'down' \(a plain tensor attribute"):
        EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, **SYNC))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_per_expert_scale_in_a_child_module_is_refused():
    model = odd.build_odd_model("child_scale")
    with pytest.raises(EPLBError, match=r"ChildScaleExperts.*'scales.down_scale' \(a tensor of the child"):
        EPLBWrapper(model, EPLBConfig(**SYNC))


def test_shared_tensor_with_E_rows_is_left_alone():
    model = odd.build_odd_model("shared_rows")
    assert model.blocks[0].experts.act_scale.shape[0] == mm.NUM_EXPERTS
    reference = copy.deepcopy(model)
    specs = find_moe_layers(model)
    assert all(spec.expert_tensors == ("gate_up_proj", "down_proj") for spec in specs)
    wrapper = EPLBWrapper(
        model, EPLBConfig(num_redundant_experts=4, **SYNC), initial_placement=_permuted_placement(len(specs))
    )
    _assert_equal_outputs("shared_rows", wrapper, reference)


def test_float8_experts_with_per_expert_scales_are_moved_with_their_scales():
    model = odd.build_odd_model("float8")
    reference = copy.deepcopy(model)
    specs = find_moe_layers(model)
    assert set(specs[0].expert_tensors) == {"gate_up_proj", "down_proj", "gate_up_scale", "down_scale"}
    wrapper = EPLBWrapper(
        model, EPLBConfig(num_redundant_experts=4, **SYNC), initial_placement=_permuted_placement(len(specs))
    )
    assert wrapper.eplb_layers[0].slot_tensors()["gate_up_proj"].dtype == torch.float8_e4m3fn
    _assert_equal_outputs("float8", wrapper, reference)


def test_meta_float8_model_loads_from_safetensors(tmp_path):
    full = odd.build_odd_model("float8")
    path = tmp_path / "model.safetensors"
    save_model(full, str(path))
    with meta_parameters():
        model = odd.build_odd_model("float8")
    wrapper = EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, **SYNC), device="cpu")
    wrapper.load_logical_state_dict(path)
    _assert_equal_outputs("float8", wrapper, full)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_meta_model_loads_what_save_pretrained_writes(kind, tmp_path):
    """transformers writes each expert's projections as separate keys (Mixtral under its original
    module names): eplb assembles each needed row from them, lazily."""
    full = _build(kind)
    full.save_pretrained(tmp_path, max_shard_size="100KB")
    wrapper = EPLBWrapper(_build_meta(kind), EPLBConfig(num_redundant_experts=4, **SYNC), device="cpu")
    report = wrapper.load_logical_state_dict(tmp_path)
    # Per layer: gate_up_proj from 2 tensors per expert, down_proj from 1; one process holds all 8.
    assert report.expert_rows_read == 2 * 3 * mm.NUM_EXPERTS
    _assert_equal_outputs(kind, wrapper, full)


def test_tied_embeddings_stay_tied_and_load_from_one_name(tmp_path):
    import transformers as tf

    config = tf.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    full = tf.Qwen3MoeForCausalLM(config).eval()
    full.save_pretrained(tmp_path)  # writes the tied tensor once
    with meta_parameters():
        model = tf.Qwen3MoeForCausalLM(config).eval()
    wrapper = EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, **SYNC), device="cpu")
    assert wrapper.module.lm_head.weight is wrapper.module.model.embed_tokens.weight
    wrapper.load_logical_state_dict(tmp_path)  # strict: one name of the tied pair is enough
    _assert_equal_outputs("qwen3_moe", wrapper, full)


@pytest.mark.parametrize("kind", ["moe", "module_list"])
def test_wrapping_releases_the_replaced_experts(kind):
    """A rank keeps its S slots per layer, not the E experts it wrapped."""
    import gc
    import weakref

    model = _build(kind)
    experts = model.blocks[0].experts
    original = weakref.ref(experts.gate_up_proj if kind == "moe" else experts[0].w1.weight)
    del experts
    wrapper = EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, **SYNC))
    gc.collect()
    assert original() is None
    reference = _build(kind)
    _assert_equal_outputs(kind, wrapper, reference)
    restored = wrapper.unwrap()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in restored.state_dict().items())


def test_a_bad_source_during_an_async_rebalance_still_finishes_it_and_changes_no_weight():
    """Every rank settles the rebalance in flight (a collective), whether or not its source is valid."""
    model = _build("moe")
    config = EPLBConfig(num_redundant_experts=4, use_async=True, step_interval=10_000)
    with EPLBWrapper(model, config) as wrapper:
        _out("moe", wrapper, mm.hidden_batch(0))
        wrapper.rebalance()
        assert wrapper.async_in_flight
        with pytest.raises(EPLBError, match="unexpected keys"):
            wrapper.load_logical_state_dict({"nope": torch.zeros(1)})
        assert not wrapper.async_in_flight
        _assert_equal_outputs("moe", wrapper, _build("moe"))


def test_a_model_with_real_experts_and_meta_dense_tensors_is_materialised_and_loaded():
    full = _build("moe")
    model = _build("moe")
    model.blocks[1].gate.to_empty(device="meta")  # e.g. a part the trainer will send later
    wrapper = EPLBWrapper(model, EPLBConfig(num_redundant_experts=4, **SYNC))
    with pytest.raises(EPLBError, match=r"1 of its tensors hold no weights yet \(e.g. \['blocks.1.gate.weight'\]\)"):
        wrapper(mm.hidden_batch(0))
    wrapper.load_logical_state_dict({"blocks.1.gate.weight": full.blocks[1].gate.weight}, strict=False)
    _assert_equal_outputs("moe", wrapper, full)


def test_model_load_state_dict_with_per_expert_checkpoint_keys_is_refused(tmp_path):
    from safetensors.torch import load_file

    full = _build("mixtral")
    full.save_pretrained(tmp_path)  # experts.{e}.w1.weight under block_sparse_moe
    state = load_file(str(next(tmp_path.glob("*.safetensors"))))
    wrapper = EPLBWrapper(_build("mixtral"), EPLBConfig(num_redundant_experts=4, **SYNC))
    before = _snapshot(wrapper)
    with pytest.raises(EPLBError, match=r"unwrapped model's expert keys \('model.layers.0.block_sparse_moe.experts"):
        wrapper.module.load_state_dict(state, strict=False)
    _assert_unchanged(wrapper, before)



def test_save_pretrained_on_the_wrapper_is_refused(tmp_path):
    """transformers' save_pretrained reached through the wrapper would write physical-slot rows under
    the logical keys (a checkpoint that loads with random experts): refused, pointing to unwrap()."""
    from eplb.moe import MoE

    wrapper = EPLBWrapper(torch.nn.Sequential(MoE(8, 16, num_experts=4, top_k=2)),
                          EPLBConfig(num_redundant_experts=2, use_async=False))
    with pytest.raises(EPLBError, match=r"save_pretrained .* physical slots.*wrapper\.unwrap\(\)"):
        wrapper.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight_map", [5, {"model.embed_tokens.weight": 5}, ["a"]])
def test_malformed_safetensors_index_is_one_clear_error(tmp_path, weight_map):
    from eplb.moe import MoE

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    wrapper = EPLBWrapper(torch.nn.Sequential(MoE(8, 16, num_experts=4, top_k=2)),
                          EPLBConfig(num_redundant_experts=2, use_async=False))
    with pytest.raises(EPLBError, match=r"weight_map must map each tensor name to a file name"):
        wrapper.load_logical_state_dict(tmp_path)
