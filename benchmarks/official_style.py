"""A per-image loop that does what the paper's test script does, as the speed baseline.

Batch 1, fp32, the face detector built and loaded again for every image, LIQE over the full unfold
of the image (every 224² patch at stride 32 materialised, then 15 picked), torchvision transforms.
It reuses our networks so the comparison measures the procedure, not different weights.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision import transforms

from piqa_core.checkpoints import Bundle
from piqa_core.faces import FaceDetector, crop_face


def official_style_score(bundle: Bundle, data: bytes, device: torch.device) -> float:
    cfg = bundle.config
    pp = cfg.preprocess
    img = Image.open(io.BytesIO(data)).convert("RGB")
    detector = FaceDetector(cfg.face).eval()  # re-built per image, as detect_face.detect() does
    detector.load_state_dict(bundle.detector.state_dict())
    detector.to(device)
    face = crop_face(img, detector.detect_images([img])[0], cfg.face.margin)
    tf = transforms.Compose([
        transforms.Resize(pp.resize), transforms.FiveCrop(pp.crop),
        lambda crops: torch.stack([transforms.Normalize(pp.mean, pp.std)(transforms.ToTensor()(c)) for c in crops]),
    ])
    with torch.no_grad():
        x = transforms.Normalize(cfg.liqe.mean, cfg.liqe.std)(transforms.ToTensor()(img)).unsqueeze(0).to(device)
        p, s = cfg.liqe.patch, cfg.liqe.stride
        x = x.unfold(2, p, s).unfold(3, p, s).permute(2, 3, 0, 1, 4, 5).reshape(-1, 3, p, p)
        step = x.size(0) // cfg.liqe.num_patches
        x = x[[step * i for i in range(cfg.liqe.num_patches)]]
        clip = bundle.liqe.clip
        feats = torch.nn.functional.normalize(clip.encode_image(x), dim=-1)
        aux = (clip.logit_scale.exp() * feats @ bundle.liqe.text_features.t()).mean(0, keepdim=True)
        out = bundle.model(tf(img).to(device), tf(face).to(device), torch.cat([aux] * 5))
    return float(out.mean())
