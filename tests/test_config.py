"""Configs are strict: every key a file, a later parent or a `--set` override sets must exist in the schema."""
import pytest
from omegaconf import OmegaConf

from worldstream.engine.config import CONFIG_ROOT, ConfigError, load_config

NAMES = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.yaml")
               if not p.name.startswith("_"))
def schema_of(name: str):
    """The schema of a shipped config: its family folder's parentless `_base.yaml`."""
    return OmegaConf.load(CONFIG_ROOT / name.split("/")[0] / "_base.yaml")


def leaf_keys(cfg, prefix: str = "") -> set[str]:
    keys = set()
    for key in cfg.keys():
        node = cfg._get_node(key)
        keys |= leaf_keys(node, f"{prefix}{key}.") if OmegaConf.is_dict(node) else {f"{prefix}{key}"}
    return keys


@pytest.mark.parametrize("name", NAMES)
def test_shipped_configs_load_with_the_base_schema(name):
    cfg = load_config(name)
    assert leaf_keys(cfg) == leaf_keys(schema_of(name))
    if cfg.family == "matrix_game_2":
        assert cfg.mode in ("universal", "gta_drive", "templerun")


def test_overrides_of_existing_keys_apply():
    cfg = load_config("mg2/universal_tiny", ["limits.max_blocks=5", "device=cuda:1", "dit.action.blocks=[0,1]"])
    assert (cfg.limits.max_blocks, cfg.device, list(cfg.dit.action.blocks)) == (5, "cuda:1", [0, 1])


@pytest.mark.parametrize("override, message", [
    ("limts.max_blocks=5", "--set limts.max_blocks=5: unknown config key 'limts' (did you mean 'limits'?)"),
    ("limits.max_blokcs=5", "unknown config key 'limits.max_blokcs' (did you mean 'limits.max_blocks'?)"),
    ("dit.action.heads=3", "unknown config key 'dit.action.heads' (did you mean 'dit.action.heads_num'?)"),
    ("colour=red", "unknown config key 'colour'"),
])
def test_unknown_override_key_is_an_error(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config("mg2/universal_tiny", [override])
    assert message in str(caught.value)


def test_file_setting_an_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(f"inherit: {CONFIG_ROOT / 'mg2' / 'universal_tiny.yaml'}\nvideo:\n  heigth: 64\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert f"{path}: unknown config key 'video.heigth' (did you mean 'video.height'?)" in str(caught.value)


def test_later_parent_may_only_set_keys_of_the_first(tmp_path):
    (tmp_path / "extra.yaml").write_text("video:\n  fps: 8\n  depth: 3\n")
    path = tmp_path / "mine.yaml"
    path.write_text(f"inherit: [{CONFIG_ROOT / 'mg2' / 'universal.yaml'}, extra.yaml]\n")
    with pytest.raises(ConfigError, match="extra.yaml: unknown config key 'video.depth'"):
        load_config(str(path))


def test_inheriting_file_sets_existing_keys(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(f"inherit: {CONFIG_ROOT / 'mg2' / 'templerun_tiny.yaml'}\nvideo:\n  height: 64\n")
    cfg = load_config(str(path))
    assert (cfg.mode, cfg.video.height, cfg.video.width) == ("templerun", 64, 176)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="mg2/universal_tiny"):
        load_config("mg2/nope")
