"""The embedded synthetic demo: generated chest-X-ray-like images, no real patients."""

import torch

DEMO_CLASSES = ["normal lungs", "pneumonia", "pleural effusion"]


def synthetic_xrays(n: int, seed: int, size: int = 64) -> tuple:
    """Deterministic chest-X-ray-like images: two lung fields over a body silhouette.

    Class 1 ("pneumonia") adds a faint blurred consolidation somewhere in one
    lung; class 2 ("pleural effusion") fills the bottom of one lung up to a
    fluid level; class 0 ("normal lungs") has neither. Anatomy, exposure,
    noise and the finding's size, side and place vary per image, so the
    finding must be recognised, not memorised.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, labels = [], []
    for i in range(n):
        label = i % len(DEMO_CLASSES)
        r = torch.rand(12, generator=g)
        body = torch.exp(-((xx / (0.85 + 0.1 * r[0])) ** 2 + (yy / 1.1) ** 2) ** 2) * (0.45 + 0.2 * r[8])
        img = body.clone()
        side = 1 if r[6] > 0.5 else -1
        for s in (-1, 1):
            cx, cy = s * (0.38 + 0.06 * r[1]), -0.05 + 0.1 * r[2]
            ax, ay = 0.26 + 0.04 * r[3], 0.55 + 0.08 * r[4]
            lung = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
            if label == 2 and s == side:
                level = cy + ay * (0.25 + 0.35 * r[9])
                lung = lung & (yy < level - 0.05 * (xx - cx).abs() / ax)
            img = torch.where(lung, img * (0.3 + 0.1 * r[10]), img)
        ribs = 0.06 * torch.sin(yy * (18 + 4 * r[5]) + xx * 2).clamp_min(0)
        img = img + ribs * (img > 0.1)
        if label == 1:
            px, py = side * (0.3 + 0.15 * r[11]), -0.4 + 0.7 * r[7]
            width = 0.01 + 0.03 * r[9]
            img = img + (0.2 + 0.15 * r[10]) * torch.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / width))
        img = img + 0.08 * torch.randn(size, size, generator=g)
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        labels.append(label)
    return images, labels
