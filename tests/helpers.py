"""Helpers shared by the tests (tiny models, networks with non-zero experts)."""

from __future__ import annotations

import torch

from lora_moe_core.adapters.network import LoRAMoENetwork
from lora_moe_core.config import Config
from lora_moe_core.model.wan import linear_shapes, resolve_targets


def randomize_experts(network: LoRAMoENetwork, std: float = 0.2) -> None:
    """Give the zero-initialised expert B matrices values, as training would."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for experts in network.experts.values():
            experts.lora_B.copy_(torch.randn(experts.lora_B.shape, generator=generator) * std)


def make_network(config: Config, transformer: torch.nn.Module, base_lora=None) -> LoRAMoENetwork:
    shapes = linear_shapes(transformer)
    targets = resolve_targets(config.lora, len(transformer.blocks))
    return LoRAMoENetwork(config, targets, shapes, base_lora=base_lora)


def run(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]


def assert_one_line_error(capsys, argv: list[str], *words: str, main=None) -> str:
    """``lora-moe argv`` exits 2 with exactly one ``error:`` line on stderr naming ``words``.

    ``main`` replaces ``lora_moe_core.cli.main`` (e.g. a CLI built with extra subcommands).
    """
    if main is None:
        from lora_moe_core.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def unlabelled_copy(cache: str, folder) -> str:
    """A copy of a latent cache whose clips carry no instrument labels (captions that name nothing)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(cache, folder)
    for path in folder.glob("*_wan.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
        tensors["instrument_labels"] = torch.zeros(4)
        tensors["instrument_probs"] = torch.full((4,), 0.25)
        save_file(tensors, path, metadata=metadata)
    return str(folder)
