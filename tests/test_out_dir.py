"""``overwrite=true`` replaces a previous run's results, only those; other folders are refused."""

from pathlib import Path

import pytest

from flower_p2p.checkpoint import open_out_dir
from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError

CONFIG = ExperimentConfig(num_nodes=3, out_dir="/x").to_run_config()


def _old_run(folder: Path) -> Path:
    """A folder as a finished run with checkpoints and plots leaves it (plus a killed write)."""
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "node-0.safetensors").write_bytes(b"old")
    (folder / "checkpoints" / "round-000002").mkdir(parents=True)
    (folder / "checkpoints" / "latest.json").write_text("{}")
    (folder / "plots").mkdir()
    for name in ("config.json", "metrics.jsonl", "network.jsonl", "summary.json",
                 "convergence.png", "attention.png", ".metrics.jsonl.ab12cd"):  # fmt: skip
        (folder / name).write_text("old")
    return folder


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_removes_every_output_of_the_previous_run(tmp_path):
    out = _old_run(tmp_path / "run")
    assert open_out_dir(out, CONFIG, resume=False, overwrite=True) is None
    assert out.is_dir() and _tree(out) == []  # no stale final/ or checkpoints/ left to mix in


def test_the_engine_only_checks_and_the_run_deletes(tmp_path):
    # sim/engine.py checks before Ray starts; the ServerApp deletes, once, after its preflight.
    out = _old_run(tmp_path / "run")
    before = _tree(out)
    open_out_dir(out, CONFIG, resume=False, overwrite=True, check_only=True)
    assert _tree(out) == before


@pytest.mark.parametrize(
    ("foreign", "named"),
    [
        ({"notes.txt": "mine", "photos/cat.png": "meow"}, "notes.txt, photos/"),
        ({"config.json": "{}", "thesis.tex": "mine"}, "thesis.tex"),
    ],
)
def test_a_folder_with_foreign_files_is_refused_and_left_intact(tmp_path, foreign, named):
    out = _old_run(tmp_path / "run")
    for name, text in foreign.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=rf"out-dir=.*holds {named}.*nothing was deleted"):
        open_out_dir(out, CONFIG, resume=False, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_home_like_folder_is_never_wiped(tmp_path):
    # out-dir=~ overwrite=true: files whose names a run also writes, but no run's config.json
    home = tmp_path / "home"
    (home / "plots").mkdir(parents=True)
    (home / "plots" / "holiday.png").write_text("mine")
    (home / "metrics.jsonl").write_text("mine")
    with pytest.raises(ConfigError, match=r"no config\.json.*nothing was deleted"):
        open_out_dir(home, CONFIG, resume=False, overwrite=True)
    assert (home / "plots" / "holiday.png").read_text() == "mine"
    (home / ".bashrc").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds \.bashrc"):
        open_out_dir(home, CONFIG, resume=False, overwrite=True)


def test_a_symlinked_output_is_unlinked_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = _old_run(tmp_path / "run")
    (out / "final" / "node-0.safetensors").unlink()
    (out / "final").rmdir()
    (out / "final").symlink_to(elsewhere, target_is_directory=True)
    open_out_dir(out, CONFIG, resume=False, overwrite=True)
    assert _tree(out) == [] and (elsewhere / "keep.txt").read_text() == "mine"


def test_without_overwrite_a_run_folder_is_refused(tmp_path):
    out = _old_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="overwrite=true"):
        open_out_dir(out, CONFIG, resume=False, overwrite=False)
    assert (out / "final" / "node-0.safetensors").exists()


def test_a_compare_folder_is_overwritten_with_its_runs_and_nothing_else(tmp_path):
    from flower_p2p.results import prepare_out_dir
    from sim.compare import compare_outputs

    out = tmp_path / "compare"
    for name in ("dsgd", "local", "centralized"):
        _old_run(out / name)
    (out / "compare.md").write_text("old")
    (out / "plots").mkdir()
    prepare_out_dir(out, True, compare_outputs)
    assert _tree(out) == []
    _old_run(out / "dsgd")
    (out / "dsgd" / "mine.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"dsgd.*holds mine\.txt"):
        prepare_out_dir(out, True, compare_outputs)
    assert (out / "dsgd" / "mine.txt").exists() and (out / "dsgd" / "final").exists()


def test_every_plot_of_a_run_is_a_known_output(tmp_path, monkeypatch):
    # overwrite must delete every figure plot_run draws, so the list cannot fall behind it
    from types import SimpleNamespace

    import sim.attention
    import sim.plots
    from flower_p2p.results import RUN_OUTPUTS

    written = []
    for name in dir(sim.plots):
        if name.endswith("_figure"):
            monkeypatch.setattr(sim.plots, name, lambda *a, **k: "figure")
    monkeypatch.setattr(sim.attention, "attention_figure", lambda *a, **k: "figure")
    monkeypatch.setattr(sim.plots, "save", lambda fig, path: written.append(path.name) or path)
    sim.plots._plot_run(SimpleNamespace(dir=tmp_path), [])
    assert written and set(written) <= RUN_OUTPUTS
