"""The `minildm` command: arguments reach the code, bad input gets one clear line, user files are never overwritten."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minildm.cli import DEMO_MARKER, main
from minildm.pipeline import PIPELINE_NAME
from minildm.pretrained import PIPELINES, VAES

SHIPPED = (VAES["shapes64"] / "model.safetensors").is_file() and (PIPELINES["shapes64"] / PIPELINE_NAME).is_file()


def test_demo_refuses_a_folder_holding_files_it_did_not_write(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit, match="did not write"):
        main(["demo", "--out", str(tmp_path)])
    assert (tmp_path / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / DEMO_MARKER).exists()


def test_train_vae_refuses_an_existing_output_folder_with_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["train-vae", "--out", str(out), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "--resume" in err, err
    assert (out / "notes.txt").read_text() == "mine"


def test_train_vae_command_trains_resumes_and_exports(tmp_path, capsys):
    run, export = tmp_path / "run", tmp_path / "export"
    common = ["--channels", "8,16", "--norm-groups", "4", "--image-size", "16", "--num-images", "16",
              "--batch-size", "4", "--save-every", "2", "--seed", "1", "--threads", "1"]
    assert main(["train-vae", "--out", str(run), "--steps", "2", *common]) == 0
    assert main(["train-vae", "--out", str(run), "--steps", "3", "--resume", "--export", str(export), *common]) == 0
    record = json.loads((export / "training.json").read_text())
    assert record["seed"] == 1 and "--resume" in record["command"]
    assert json.loads((run / "trainer.json").read_text())["step"] == 3
    config = json.loads((export / "config.json").read_text())
    assert config["block_out_channels"] == [8, 16]


@pytest.mark.skipif(not SHIPPED, reason="the shipped shapes64 VAE and pipeline are not built yet")
@pytest.mark.slow
def test_demo_writes_its_figures_and_says_where(tmp_path):
    """The real thing, from the shipped weights (tests/test_demo.py checks the same on a tiny random pipeline)."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "minildm", "demo", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("compression.json", "reconstructions.png", "latent_channels.png", "interpolation.png",
                 "samples.png", "reverse_diffusion.png", "reverse_diffusion.gif", "guidance_sweep.png",
                 "img2img_strength.png", "inpainting.png", "vae_swap.png"):
        assert (out / name).is_file(), f"{name} missing; demo said:\n{result.stdout}"
        assert str(out / name) in result.stdout
    table = json.loads((out / "compression.json").read_text())
    assert [row["ratio"] for row in table] == [48.0, 48.0, 48.0]
    # running it again into its own folder is allowed (it only replaces its own figures)
    again = subprocess.run([sys.executable, "-m", "minildm", "demo", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
