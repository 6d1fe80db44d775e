"""The proxy zoo and the student panel of the toy world (issue 16): opt-in, built like the student, cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from antidistill.proxy import load_causal_lm
from antidistill.toyworld.build import ToyWorldConfig, ZooConfig, build_world
from antidistill.toyworld.models import ModelSpec, build_model

QUICK = Path(__file__).resolve().parents[1] / "src" / "antidistill" / "configs" / "quick.yaml"

# the key of the default format-3 world before zoos existed: a running --full reuses worlds cached under it
DEFAULT_KEY = "e61570b7471f"

TINY_ZOO = {
    "proxies": {"gpt2-sibling": {"family": "gpt2", "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64},
                "llama-same": {"family": "llama", "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64},
                "gpt2-small": {"family": "gpt2", "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}},
    "panel": {"neox": {"family": "gpt_neox", "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64},
              "opt": {"family": "opt", "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}},
}


def tiny_world_cfg(zoo: dict | None = TINY_ZOO) -> ToyWorldConfig:
    world = yaml.safe_load(QUICK.read_text())["world"] | {"teacher_train": {"steps": 4, "batch_size": 8},
                                                          "pretrain": {"steps": 4, "batch_size": 8}}
    return ToyWorldConfig(**world, zoo=zoo)


def test_default_world_key_is_unchanged():
    assert ToyWorldConfig().key() == DEFAULT_KEY
    assert ToyWorldConfig(zoo=TINY_ZOO).key() == DEFAULT_KEY  # the zoo has its own key beside the world


def test_zoo_names_are_checked():
    with pytest.raises(ValueError, match="repeats"):
        ZooConfig(proxies={"a": ModelSpec("gpt2", 8, 1, 2, 16)}, panel={"a": ModelSpec("opt", 8, 1, 2, 16)})
    with pytest.raises(ValueError, match="a-z"):
        ZooConfig(proxies={"A/b": ModelSpec("gpt2", 8, 1, 2, 16)})
    with pytest.raises(ValueError, match="repeats"):  # the shipped proxy's name is taken
        ZooConfig(proxies={"qwen2-small": ModelSpec("qwen2", 8, 1, 2, 16)})


def test_zoo_seeds_are_distinct_and_do_not_move_when_the_zoo_grows():
    a = ZooConfig(proxies={"x": ModelSpec("gpt2", 8, 1, 2, 16)})
    b = ZooConfig(proxies={"x": ModelSpec("gpt2", 8, 1, 2, 16), "y": ModelSpec("gpt2", 8, 1, 2, 16)})
    assert a.seed(0, "proxies", "x") == b.seed(0, "proxies", "x") != b.seed(0, "proxies", "y")
    assert a.seed(0, "proxies", "x") != a.seed(1, "proxies", "x")


def test_the_zoo_builds_each_model_as_configured_and_is_reused(tmp_path):
    cfg = tiny_world_cfg()
    world = build_world(cfg, tmp_path, progress=False)
    plain = build_world(tiny_world_cfg(None), tmp_path, progress=False)
    assert world.root == plain.root and plain.zoo_root is None  # one world, the zoo beside it
    families = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
                "opt": "OPTForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    info = json.loads((world.zoo_root / "zoo.json").read_text())
    specs = cfg.named_specs()
    assert set(specs) == {"qwen2-small", "gpt2", "gpt2-sibling", "llama-same", "gpt2-small", "neox", "opt"}
    seeds = set()
    for name, (kind, folder, spec) in specs.items():
        model = load_causal_lm(str(world.named_model_path(folder)))
        assert type(model).__name__ == families[spec.family], name
        assert model.config.hidden_size == spec.hidden and model.config.num_hidden_layers == spec.layers, name
        if folder.startswith("zoo/"):
            rec = info["models"][folder.removeprefix("zoo/")]
            assert rec["params"] == sum(p.numel() for p in model.parameters())
            seeds.add(rec["seed"])
    assert len(seeds) == 5
    # the sibling is the base student's family and size with another seed: other weights
    sib = load_causal_lm(str(world.named_model_path("zoo/proxies/gpt2-sibling")))
    base = load_causal_lm(str(world.model_path("student")))
    assert type(sib) is type(base)
    assert not all((a == b).all() for a, b in zip(sib.parameters(), base.parameters()))
    stamp = (world.zoo_root / "zoo.json").stat().st_mtime_ns
    again = build_world(cfg, tmp_path, progress=False)
    assert again.zoo_root == world.zoo_root and (world.zoo_root / "zoo.json").stat().st_mtime_ns == stamp
    assert again.metrics["zoo_panel_opt_params"] == info["models"]["panel/opt"]["params"]


class _Tok:
    """What build_model reads of a tokenizer: its width and special ids (conftest's tiny vocabulary)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __len__(self):
        return 48


@pytest.mark.parametrize("family", ["gpt_neox", "opt"])
def test_the_new_families_give_the_brute_force_delta_under_left_padding(family):
    """Δ̂ of a GPT-NeoX or OPT proxy (the zoo's and the panel's new families) through the cached engine, on a
    left-padded batch, equals separate θ ± εg models recomputed from scratch on each unpadded row."""
    import torch
    from conftest import left_pad, random_prompts, reference_delta

    from antidistill.proxy import ProxyDelta

    model = build_model(ModelSpec(family, 24, 2, 4, 48), _Tok(), seed=3).eval()
    gen = torch.Generator().manual_seed(2)
    grad = {n: torch.randn(p.shape, generator=gen) * 0.05 for n, p in model.named_parameters()}
    emb = model.get_input_embeddings()
    name = next(n for n, p in model.named_parameters() if p is emb.weight)
    if emb.padding_idx is not None:  # as compute_proxy_gradient's g: nn.Embedding's backward skips that row
        grad[name][emb.padding_idx] = 0.0
    eps = 1e-2
    eng = ProxyDelta(model, grad, eps=eps, pad_token_id=0)
    rows = random_prompts((3, 10), seed=9)
    batch = eng(left_pad(rows)["input_ids"])
    ulp = torch.finfo(torch.float32).eps
    for i, r in enumerate(rows):
        ref = reference_delta(model, grad, eps, r)
        with torch.no_grad():
            scale = torch.log_softmax(model(torch.tensor([r])).logits[0, -1].float(), -1).abs().max().clamp(min=1)
        torch.testing.assert_close(batch[i], ref, atol=8 * ulp * float(scale) / (2 * eps), rtol=0)


def test_a_run_directory_from_before_the_zoo_keeps_its_config_text():
    """config.yaml leaves out an unset zoo and empty arm_proxies, so run directories made before resume."""
    from antidistill.config import load_config
    from antidistill.experiment.sweepconfig import SweepConfig, config_text

    text = config_text(load_config(SweepConfig, QUICK, []))
    assert "zoo" not in text and "arm_proxies" not in text
    zoo = config_text(load_config(SweepConfig, QUICK, ["arm_proxies=[gpt2-sibling]"],
                                  {"world.zoo": TINY_ZOO}))
    assert "arm_proxies:\n- gpt2-sibling" in zoo and "gpt2-sibling:" in zoo
