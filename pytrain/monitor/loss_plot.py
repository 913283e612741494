"""A loss-curve plot as a standalone SVG file (no plotting library needed)."""

from pathlib import Path


def write_loss_svg(path: Path, steps: list[int], losses: list[float], title: str = "training loss") -> None:
    width, height, pad = 640, 360, 48
    if not steps:
        return
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    first, last = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def x(step):
        return pad + (step - first) / (last - first) * (width - 2 * pad)

    def y(loss):
        return height - pad - (loss - lo) / (hi - lo) * (height - 2 * pad)

    points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, losses))
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" \
font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>
<text x="{pad}" y="{height - pad + 16}" text-anchor="middle">{first}</text>
<text x="{width - pad}" y="{height - pad + 16}" text-anchor="middle">{last}</text>
<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step</text>
<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{hi:.2f}</text>
<text x="{pad - 4}" y="{height - pad + 4}" text-anchor="end">{lo:.2f}</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>
</svg>
"""
    Path(path).write_text(svg)
