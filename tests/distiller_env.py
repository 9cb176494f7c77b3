"""Finding a real Distiller for the integration tests: skip without one, fail if DCQ_REQUIRE_DISTILLER=1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MNIST_DIR

REQUIRED = os.environ.get("DCQ_REQUIRE_DISTILLER") == "1"


def unavailable(reason):
    if REQUIRED:
        pytest.fail(f"DCQ_REQUIRE_DISTILLER=1, but {reason}", pytrace=False)
    pytest.skip(f"{reason}; integration tests need a real Distiller (see README, 'Testing against Distiller')",
                allow_module_level=True)


def import_distiller():
    try:
        import distiller
    except ImportError as err:
        unavailable(f"Distiller is not importable ({err})")
    return distiller


def compress_classifier_script():
    import distiller
    root = Path(os.environ.get("DISTILLER_SRC") or Path(distiller.__file__).resolve().parents[1])
    script = root / "examples" / "classifier_compression" / "compress_classifier.py"
    if not script.is_file():
        unavailable(f"compress_classifier.py is not at {script} (set DISTILLER_SRC to Distiller's source directory)")
    return script


def run_compress_classifier(out_dir, *args, train_size="0.02", env=None, data_dir=MNIST_DIR, arch="simplenet_mnist"):
    """Run Distiller's unmodified compress_classifier.py on a slice of MNIST (or ``data_dir``, e.g. a
    subset directory of it); ``args`` come last (so they override the defaults); return (returncode, log)."""
    if not (MNIST_DIR / "MNIST" / "raw").is_dir():
        unavailable(f"MNIST is missing from {MNIST_DIR}")
    cmd = [sys.executable, str(compress_classifier_script()), "--arch", arch, str(data_dir), "--cpu",
           "-j", "0", "-b", "64", "--lr", "0.01", "--momentum", "0.9", "--wd", "0", "--vs", "0.1", "--seed", "0",
           "--effective-train-size", train_size, "--effective-valid-size", "0.05", "--effective-test-size", "0.02",
           "--out-dir", str(out_dir), "--print-freq", "5", *map(str, args)]
    Path(out_dir).mkdir(parents=True, exist_ok=True)  # also the cwd: Distiller writes latest_log_* links there
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
                          cwd=out_dir)
    return done.returncode, done.stdout + done.stderr


# --- Distiller's own training loop, on random images -------------------------------------------------

def build(schedule, arch="simplenet_mnist", text=None, tmp_path=None):
    """(model, optimizer, scheduler) from a schedule file (or ``text`` written to ``tmp_path``), seed 0."""
    if text is not None:
        schedule = tmp_path / "schedule.yaml"
        schedule.write_text(text)
    import distiller
    from distiller.models import create_model
    torch.manual_seed(0)
    model = create_model(False, "mnist" if arch == "simplenet_mnist" else "cifar10", arch, parallel=False, device_ids=-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer, distiller.file_config(model, optimizer, str(schedule))


def policy_of(scheduler, cls):
    return next(p for p in scheduler.sched_metadata if isinstance(p, cls))


def train_epochs(model, optimizer, scheduler, epochs, monkeypatch, batches=2, seed=0, on_epoch=None, validate=None):
    """Distiller's own training loop (image_classifier.train) on random images, ``batches`` per epoch;
    ``validate(epoch)`` between an epoch's training and its ``on_epoch_end``, where compress_classifier validates."""
    monkeypatch.syspath_prepend(str(compress_classifier_script().parent))  # image_classifier imports its parser.py
    import distiller.apputils.image_classifier as classifier
    from distiller.data_loggers import NullLogger
    args = classifier.ClassifierCompressor.mock_args()
    args.device = "cpu"
    generator = torch.Generator().manual_seed(seed)
    shape = model.input_shape[1:]
    data = torch.utils.data.TensorDataset(torch.randn(4 * batches, *shape, generator=generator),
                                          torch.randint(0, 10, (4 * batches,), generator=generator))
    for epoch in epochs:
        scheduler.on_epoch_begin(epoch)
        if on_epoch:
            on_epoch(epoch, "begin")
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        top1, _, loss = classifier.train(loader, model, torch.nn.CrossEntropyLoss(), optimizer, epoch, scheduler,
                                         [NullLogger()], args)
        if validate:
            validate(epoch)
        scheduler.on_epoch_end(epoch, optimizer, metrics={"min": loss.mean, "max": top1})
        if on_epoch:
            on_epoch(epoch, "end")
    return loss.mean


def float_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def distiller_src():
    """Distiller's source tree: $DISTILLER_SRC, or the one an importable Distiller comes from."""
    if os.environ.get("DISTILLER_SRC"):
        src = Path(os.environ["DISTILLER_SRC"]).resolve()
    else:
        try:
            import distiller
        except ImportError as err:
            unavailable(f"Distiller is not importable ({err}) and DISTILLER_SRC is not set")
        src = Path(distiller.__file__).resolve().parents[1]
    if not (src / "examples" / "classifier_compression" / "compress_classifier.py").is_file():
        unavailable(f"{src} holds no examples/classifier_compression/compress_classifier.py (set DISTILLER_SRC)")
    if not (MNIST_DIR / "MNIST" / "raw").is_dir():
        unavailable(f"MNIST is missing from {MNIST_DIR}")
    return src
