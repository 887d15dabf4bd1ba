"""Measurement 4's figure is drawn from its rows (no run needed to check the drawing)."""

from bench.scaling_plot import plot_scaling


def test_the_scaling_figure_is_a_png_written_where_asked(tmp_path):
    rows = [{"nodes": 256, "round_s": 2.9, "peak_gib": 3.3},
            {"nodes": 64, "round_s": 0.6, "peak_gib": 3.1}]  # fmt: skip
    path = plot_scaling(rows, tmp_path / "results-scaling.png")
    assert path == tmp_path / "results-scaling.png"
    assert path.read_bytes().startswith(b"\x89PNG")


def test_hosted_rows_are_drawn_beside_them(tmp_path):
    rows = [{"nodes": 1024, "round_s": 6.3, "peak_gib": 4.2},
            {"nodes": 64, "round_s": 0.5, "peak_gib": 3.1}]  # fmt: skip
    hosted = [{"nodes": 1024, "round_s": 2.2, "peak_gib": 4.2, "per_supernode": 16}]
    path = plot_scaling(rows, tmp_path / "hosted.png", hosted)
    assert path.read_bytes().startswith(b"\x89PNG")
