"""Tests of experiments.state_memory: compile-only memory of the state and the step per layout,
on 8 simulated devices with a tiny digits UNet (the 0.5-1B figures come from the command line)."""

import pytest

from experiments import state_memory

TINY = [
    "--config.data.name=digits",
    "--config.model.ch=16",
    "--config.model.ch_mult=(1,)",
    "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=()",
    "--config.model.num_groups=8",
    "--config.train.batch_size=16",
    "--config.mesh.fsdp_min_size=256",
]


def test_fsdp_holds_an_eighth_of_the_state_and_the_table_says_so(capsys):
    """One layout (each costs a compilation); shard_map's state per device is the total."""
    (fsdp,) = state_memory.main(["state_memory", *TINY, "--layouts=fsdp"])
    sharded = fsdp["state_total"] - fsdp["state_replicated"]
    assert 0 < fsdp["state_replicated"] < sharded / 20  # biases and norm scales
    assert fsdp["state_per_device"] == sharded // 8 + fsdp["state_replicated"]
    # 4 float32 copies (parameters, two moments, EMA) and int32 counters (the step, Adam's).
    assert 0 < fsdp["state_total"] - 16 * fsdp["params"] <= 16
    assert fsdp["fsdp"] == 8 and fsdp["devices"] == 8
    # The step holds the state and more; the sharded init holds about the state.
    assert fsdp["step_peak"] > fsdp["state_per_device"]
    assert fsdp["init_peak"] < 2 * fsdp["state_per_device"]
    table = capsys.readouterr().out
    assert "| fsdp (axis 8) | 8 |" in table and f"{fsdp['params']:,} parameters" in table


@pytest.mark.parametrize("layout", ["pmap", "shard_map:2", "fsdp:x"])
def test_unknown_layouts_are_one_line_and_exit_2(layout, capsys):
    with pytest.raises(SystemExit) as exit_info:
        state_memory.main(["state_memory", *TINY, f"--layouts={layout}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and layout in err[0]
