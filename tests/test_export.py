"""Every export loads as promised: a trial's ``torch.export`` programs load with torch alone, in
a process where vpns cannot be imported, and give the trial's own logits on real images; the
README's load example runs as written against a tiny trial."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny
from vpns_core.export import PROGRAM, UNPROMPTED_PROGRAM
from vpns_core.train import Trial

ROOT = Path(__file__).resolve().parents[1]

#: run first in a process without vpns: importing any of the project's packages fails there
#: (``-I`` drops PYTHONPATH; this also stops the editable install's finder)
BLOCK_VPNS = textwrap.dedent('''
    import sys

    class _NoVpns:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vpns_core", "sweeps", "search_spaces", "analysis"):
                raise ImportError(f"{name}: this process runs without vpns")
            return None

    sys.meta_path.insert(0, _NoVpns())
    try:
        import vpns_core  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("vpns_core is importable: the test would prove nothing")
''')


def run_without_vpns(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter where vpns cannot be imported; its stdout."""
    done = subprocess.run([sys.executable, "-I", "-c", BLOCK_VPNS + code + "\nassert 'vpns_core' not in sys.modules\n"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


CASES = {
    # the tiny ResNet's class lives in vpns (its state dict needs vpns); a pad prompt, two passes
    "vpns on the tiny ResNet": {},
    # a channel-pruned torchvision ResNet, no prompt: one program
    "slim on ResNet-18": dict(model="resnet18", method="slim", sparsity=0.5),
}
_trials: dict[str, Trial] = {}


def finished_trial(name: str, folder: Path) -> Trial:
    if name not in _trials:
        trial = Trial(tiny(max_steps_per_epoch=2, **CASES[name]), folder / name.replace(" ", "_"))
        trial.run()
        _trials[name] = trial
    return _trials[name]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    yield tmp_path_factory.mktemp("exports")
    _trials.clear()


@torch.no_grad()
def expected_logits(trial: Trial, images: torch.Tensor, prompted: bool) -> torch.Tensor:
    trial.model.eval()
    return trial.assembly.forward(images.to(trial.device), prompted).float().cpu()


@pytest.mark.parametrize("name", list(CASES))
def test_the_programs_load_without_vpns_and_give_the_trials_logits(name, workdir):
    trial = finished_trial(name, workdir)
    images = trial.feed.first_images(16).cpu()  # real training images, as the trial evaluates them
    torch.save({"images": images,
                "prompted": expected_logits(trial, images, trial.uses_prompt),
                "unprompted": expected_logits(trial, images, False)}, workdir / "expected.pt")
    programs = {"prompted": trial.workdir / PROGRAM}
    if trial.uses_prompt:
        programs["unprompted"] = trial.workdir / UNPROMPTED_PROGRAM
    else:
        assert not (trial.workdir / UNPROMPTED_PROGRAM).exists()  # without a prompt: one pass
    out = run_without_vpns(textwrap.dedent(f'''
        import json
        import torch
        expected = torch.load({str(workdir / "expected.pt")!r}, weights_only=True)
        report = {{}}
        for kind, path in {json.dumps({k: str(v) for k, v in programs.items()})}.items():
            model = torch.export.load(path).module()
            with torch.no_grad():
                logits = model(expected["images"])
                one = model(expected["images"][:1])  # any batch size, one image included
            report[kind] = [list(logits.shape), (logits - expected[kind]).abs().max().item(),
                            (logits.argmax(1) == expected[kind].argmax(1)).float().mean().item(),
                            (one - expected[kind][:1]).abs().max().item()]
        print(json.dumps(report))
    '''), workdir)
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) == set(programs)
    for kind, (shape, diff, agree, diff_one) in report.items():
        assert shape == [16, trial.data.num_classes], kind
        assert diff < 1e-4 and agree == 1.0 and diff_one < 1e-4, (kind, diff, agree, diff_one)
    if trial.uses_prompt:  # the two programs differ where the prompt does
        assert not torch.allclose(expected_logits(trial, images, True), expected_logits(trial, images, False))


def readme_load_example() -> str:
    """The load example of the documentation (docs/your-data.md since issue 28)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]
    found = [b for b in blocks if PROGRAM in b and "torch.export.load" in b]
    assert len(found) == 1, "the documentation's load example is missing or ambiguous"
    return found[0]


def test_the_readme_load_example_runs_as_written(workdir):
    trial = finished_trial("vpns on the tiny ResNet", workdir)
    code = readme_load_example()
    assert 'folder = "results/trials/demo"' in code
    code = code.replace('"results/trials/demo"', repr(str(trial.workdir)))
    code += f'\ntorch.save({{"images": images, "logits": logits}}, {str(workdir / "readme.pt")!r})\n'
    out = run_without_vpns(code, workdir)
    assert re.fullmatch(r"tensor\(\[\d+, \d+, \d+, \d+\]\)", out.strip()), out  # the print
    ran = torch.load(workdir / "readme.pt", weights_only=True)
    assert ran["logits"].shape == (4, trial.data.num_classes)
    assert torch.allclose(ran["logits"], expected_logits(trial, ran["images"], True), atol=1e-4)
