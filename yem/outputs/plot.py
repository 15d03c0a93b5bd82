"""A loss curve as a PNG for the model card, drawn with Pillow (no plotting library needed)."""

import math

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT, MARGIN = 720, 360, 56


def loss_curve(steps: list[float], losses: list[float | None], title: str = "training loss") -> Image.Image:
    """Raw per-step loss in light grey, its exponential moving average in blue, on linear axes. Steps whose loss
    was not finite (skipped by training) are left out."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    finite = [(step, loss) for step, loss in zip(steps, losses) if loss is not None and math.isfinite(loss)]
    if not finite:
        draw.text((MARGIN, HEIGHT // 2), f"{title}: no finite loss recorded", fill="black", font=font)
        return image
    steps, losses = [s for s, _ in finite], [v for _, v in finite]
    low, high = min(losses), max(losses)
    high = high if high > low else low + 1e-9
    first, last = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def point(step: float, loss: float) -> tuple[float, float]:
        x = MARGIN + (step - first) / (last - first) * (WIDTH - 1.5 * MARGIN)
        y = HEIGHT - MARGIN - (loss - low) / (high - low) * (HEIGHT - 1.7 * MARGIN)
        return x, y

    draw.rectangle([MARGIN, 0.7 * MARGIN, WIDTH - MARGIN / 2, HEIGHT - MARGIN], outline="#999999")
    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        _, y = point(first, value)
        draw.text((4, y - 6), f"{value:.3g}", fill="#444444", font=font)
        step = first + fraction * (last - first)
        x, _ = point(step, low)
        draw.text((x - 10, HEIGHT - MARGIN + 6), f"{step:.0f}", fill="#444444", font=font)
    draw.text((WIDTH // 2 - 20, HEIGHT - 20), "step", fill="#444444", font=font)
    draw.text((MARGIN, 10), title, fill="black", font=font)
    if len(steps) > 1:
        draw.line([point(s, v) for s, v in zip(steps, losses)], fill="#cccccc", width=1)
        draw.line([point(s, v) for s, v in zip(steps, smooth(losses))], fill="#1f5fbf", width=2)
    return image


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out
