"""Helpers the bench scripts share: the timm CNN list, a per-model time limit, rewriting a marked section of a doc."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


# One small variant per timm family (CNNs, plus a few hybrid conv nets).
TIMM_CNNS = """
resnet18 resnet26d resnetv2_50 resnext26ts seresnext26d_32x4d efficientnet_b0 efficientnetv2_rw_t
tf_efficientnet_lite0 mobilenetv3_small_100 mobilenetv2_100 mobilenetv4_conv_small convnext_atto
convnextv2_atto regnetx_002 regnety_002 regnetz_b16 densenet121 ghostnet_100 ghostnetv2_100
rexnet_100 dla34 dpn68 hrnet_w18_small res2net50_14w_8s resnest14d cspresnet50 cspdarknet53
darknet17 mixnet_s tinynet_e ese_vovnet19b_dw selecsls42b nf_resnet26 dm_nfnet_f0 repvgg_a0
mnasnet_100 fbnetc_100 spnasnet_100 hardcorenas_a lcnet_050 mobileone_s0 fastvit_t8
edgenext_xx_small mobilevit_xxs xception41 inception_v3 inception_v4 gernet_s hgnetv2_b0
skresnet18 legacy_seresnet18 resnetrs50 vgg11 efficientvit_b0 starnet_s1 tresnet_m botnet26t_256
repghostnet_050 cs3darknet_focus_s rdnet_tiny resnet50_gn
""".split()


class Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise Timeout in the main thread after ``seconds`` (SIGALRM)."""
    def handler(signum: int, frame: Any) -> None:
        raise Timeout(f"timed out after {seconds}s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_section(doc: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between ``begin`` and ``end`` in ``doc`` (``lines`` include both markers), or append it."""
    text = doc.read_text() if doc.exists() else "# Coverage\n"
    section = "\n".join(lines)
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
