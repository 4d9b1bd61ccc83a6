"""Every zoo pair the shipped configs name gets the same stage pairs automatically as its registered taps give.

For each config in configs/ and configs/cifar100/: the pairs a run used before automatic pairing (the
config's ``warmup.pairs``, else the stage taps both models share by name) against the automatic ones
(:func:`indistill.pairing.pair_taps` without ``warmup.pairs``: equal H x W shallow to deep, by depth when
``warmup.resize`` is set), over the student taps the warmup distils. Where they differ, ``EXPLAINED``
says why. A config without ``warmup.pairs`` runs the automatic pairs, so for those no difference is allowed.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest

from indistill.config import load_config
from indistill.models import model_taps
from indistill.pairing import normalise_pairs, pair_taps
from indistill.pipeline import build_model

ROOT = Path(__file__).resolve().parent.parent / "src" / "indistill" / "configs"
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.yaml"))
# num_classes, in_channels, image side of each dataset the configs name (what the models are built for)
DATA = {"digits": (10, 1, 32), "fashion_mnist": (10, 1, 32), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32),
        "imagenet": (1000, 3, 224)}

EXPLAINED = {
    # resnet32x4 (64/128/256 ch at 32/16/8) -> ShuffleV1 (stem 24 ch at 32, stages 240/480/960 at 16/8/4) with
    # resize: bilinear. The config hand-picks teacher stage3 (256 ch at 8x8, upsampled to 16x16) for student
    # stage1 (240 ch): the only teacher tap wide enough for it. Automatic pairs with resize go by depth, evenly
    # spaced (teacher stage1/2/3 -> student stem/stage2/stage3), which leaves student stage1 unpaired; of the
    # warmup's taps [stem, stage1] only stem -> teacher stage1 is the same.
    "cifar100/resnet32x4-ShuffleV1.yaml": {"before": [("layer1", "relu"), ("layer3", "layer1")],
                                           "auto": [("layer1", "relu")]},
}


def _pairs_by_module(cfg):
    n, c, s = DATA[cfg.data.name]
    data = SimpleNamespace(num_classes=n, in_channels=c, image_size=s, name=cfg.data.name)
    source = build_model(cfg.auxiliary if cfg.auxiliary.enabled else cfg.teacher, data)
    student = build_model(cfg.student, data)
    t_specs, s_specs = model_taps(source), model_taps(student)
    before = normalise_pairs(cfg.warmup.pairs, t_specs, s_specs)  # what a run paired before: explicit or by name
    auto = pair_taps(source, student, (c, s, s), resize=cfg.warmup.resize)
    used = cfg.warmup.taps or list(before.values())
    return (sorted((t_specs[t], s_specs[x]) for t, x in before.items() if x in used),
            sorted((t_specs[t], s_specs[x]) for t, x in auto.items() if x in used))


@pytest.mark.parametrize("config", CONFIGS)
def test_automatic_pairs_equal_the_registered_ones(config):
    cfg = load_config(ROOT / config)
    before, auto = _pairs_by_module(cfg)
    if config in EXPLAINED:
        assert cfg.warmup.pairs, "an explained difference needs the config's own warmup.pairs, which the run uses"
        assert {"before": before, "auto": auto} == EXPLAINED[config]
    else:
        assert auto == before


def test_every_config_is_covered():
    assert len(CONFIGS) >= 20 and set(EXPLAINED) <= set(CONFIGS)


# Found taps (`taps: auto`) against the registered ones, for every zoo model the configs name. Where they differ:
# the found taps add the map of the input's own level when a net does more there than its first block
# (FULL_RES), or take the LAST map of a size where the registry follows the CRD benchmark's choice (LAST_MAP).
FULL_RES = "a stage at the map before the first downsampling, which the registry leaves out"
LAST_MAP = "the last map of each size (before the pooling / the final 1x1 conv), where the registry keeps the benchmark's"
FOUND = {
    "cnn32": ([("block1.relu", (16, 30, 30)), ("block1", (16, 15, 15)), ("block2", (32, 6, 6)), ("block3", (64, 2, 2))], FULL_RES),
    "cnn32_small": ([("block1.relu", (8, 30, 30)), ("block1", (8, 15, 15)), ("block2", (16, 6, 6)), ("block3", (32, 2, 2))], FULL_RES),
    "ShuffleV1": ([("relu", (24, 32, 32)), ("layer1", (240, 16, 16)), ("layer2", (480, 8, 8)), ("layer3", (960, 4, 4))], FULL_RES),
    "ShuffleV2": ([("relu", (24, 32, 32)), ("layer1", (116, 16, 16)), ("layer2", (232, 8, 8)), ("relu2", (1024, 4, 4))],
                  FULL_RES + "; and " + LAST_MAP),
    "resnet18": ([("relu", (64, 112, 112)), ("layer1", (64, 56, 56)), ("layer2", (128, 28, 28)), ("layer3", (256, 14, 14)),
                  ("layer4", (512, 7, 7))], FULL_RES),
    "resnet34": ([("relu", (64, 112, 112)), ("layer1", (64, 56, 56)), ("layer2", (128, 28, 28)), ("layer3", (256, 14, 14)),
                  ("layer4", (512, 7, 7))], FULL_RES),
    "MobileNetV2": ([("blocks.1", (12, 16, 16)), ("blocks.2", (16, 8, 8)), ("blocks.4", (48, 4, 4)), ("conv2", (1280, 2, 2))],
                    LAST_MAP),
    "vgg8": ([("block0", (64, 32, 32)), ("block1", (128, 16, 16)), ("block2", (256, 8, 8)), ("block4", (512, 4, 4))], LAST_MAP),
    "vgg13": ([("block0", (64, 32, 32)), ("block1", (128, 16, 16)), ("block2", (256, 8, 8)), ("block4", (512, 4, 4))], LAST_MAP),
}


def _zoo_models():
    out = {}
    for config in CONFIGS:
        cfg = load_config(ROOT / config)
        for spec in (cfg.teacher, cfg.student, *([cfg.auxiliary] if cfg.auxiliary.enabled else [])):
            out.setdefault(spec.name, cfg.data.name)
    return sorted(out.items())


@pytest.mark.parametrize("name, dataset", _zoo_models())
def test_found_taps_against_the_registered_ones(name, dataset):
    from indistill.models import create_model
    from indistill.pairing import stage_order

    n, c, s = DATA[dataset]
    registered = create_model(name, n, c)
    found = create_model(name, n, c, input_shape=(c, s, s), taps="auto")

    def stages(m):
        specs = model_taps(m)
        return [(specs[k], v) for k, v in stage_order(m, (c, s, s)).items()]

    assert model_taps(found)["embedding"] == model_taps(registered)["embedding"]
    assert stages(found) == (FOUND[name][0] if name in FOUND else stages(registered))
