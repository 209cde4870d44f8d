"""Lever study of issue 13: which P-CAM variant makes slice-tag CAMs land on the organs? (quick, no pipeline)

Trains one classifier variant on the training slices and tags of a prepared work directory (`ccam
prepare` done; the manifest's masks are read for scoring only) with the budget of the demo's P-CAM
(30 epochs of batch 16, Adam 2e-3, intensity jitter and +-4 px shifts, no flips), then scores its
CAM coarse masks (argmax over [tau, CAM], tau 0.25 / 0.4 / 0.6), the pointing game (CAM peak
inside the organ, dilated by 1 px) and the share of CAM mass inside the organ on tagged slices.
Builds on the throw-away prototypes in ../shared/research (loc_proto.py: data loading, the GAP
baseline, the contact sheet). Appends one JSON line per run to benchmarks/results/localisation_levers.jsonl.

variants: gap (GAP ResNet-18 w0.25 OS8, as landed before issue 13);
  <depth>_<extras>_<pool>: FCN of depth s (receptive field 19 px, OS 2) or d (35 px, OS 4) with
  extras nc (none), c (x/y input channels), p (additive position maps x, y, x^2, y^2, xy in the
  head), x (exclusive: per-pixel softmax over [background, classes] before pooling), l (laterality:
  left/right twins confined to their half), combined as px, xl, pxl, nl; pool topk / gap / max;
  pcam_<os>_<pooling>_<0|1 position maps>: the pipeline's own `ccam.models.pcam.PCAM` (local trunk).

    .venv/bin/python benchmarks/localisation_levers.py runs/demo runs/demo/data/manifest.json s_pxl_topk --width 16 --png sheet.png
"""
import argparse, json, time, sys
from pathlib import Path
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO.parent / "shared" / "research")]
from loc_proto import load, coords, Gap  # noqa: E402
from ccam.models.pcam import PCAM

def block(i, o, stride=1, d=1):
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, d, dilation=d, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

class FCN(nn.Module):
    def __init__(self, k, width=32, depth="s", coord=False, pool="topk", frac=0.01, fracs=None):
        super().__init__()
        w = width; cin = 3 if coord else 1
        if depth == "s":   # RF ~ 18 px, OS 2
            layers = [block(cin, w), block(w, w), block(w, 2*w, 2), block(2*w, 2*w), block(2*w, 4*w), block(4*w, 4*w)]
        else:              # RF ~ 35 px, OS 4
            layers = [block(cin, w), block(w, w), block(w, w, 2), block(w, 2*w), block(2*w, 2*w), block(2*w, 2*w, 2), block(2*w, 4*w), block(4*w, 4*w)]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(4*w, k, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(k))
        self.coord, self.pool = coord, pool
        self.register_buffer("fracs", torch.tensor(fracs if fracs is not None else [frac]*k, dtype=torch.float32))
        self.pos = None
    def cams(self, x):
        if self.coord: x = torch.cat([x, coords(x.shape[0], x.shape[-1])], 1)
        f = self.body(x)
        c = self.classifier(f)
        if self.pos is not None:
            b, _, h, w = f.shape
            xy = coords(b, h, f.device); xx, yy = xy[:, :1], xy[:, 1:]
            c = c + self.pos(torch.cat([xx, yy, xx * xx, yy * yy, xx * yy], 1))
        if getattr(self, "side", None) is not None:
            h, w = c.shape[-2:]
            xx = torch.linspace(-1, 1, w)[None, None, None, :].expand(1, 1, h, w)
            allowed = (xx * self.side[None, :, None, None]) >= -0.1
            c = torch.where(allowed, c, torch.full_like(c, -1e4))
        return c
    def forward(self, x):
        c = self.cams(x).flatten(2)
        n = c.shape[-1]
        if getattr(self, "excl", False):
            # per-pixel competition: softmax over [background 0, K classes]; pool class probabilities
            pr = torch.softmax(torch.cat([torch.zeros_like(c[:, :1]), c], 1), 1)[:, 1:]
            kk = max(1, int(round(float(self.fracs[0]) * n)))
            q = pr.topk(kk, -1).values.mean(-1).clamp(1e-6, 1 - 1e-6)
            return torch.log(q) - torch.log1p(-q)
        if self.pool == "gap": p = c.mean(-1)
        elif self.pool == "max": p = c.amax(-1)
        else:
            srt = c.sort(-1, descending=True).values
            outs = []
            for j in range(c.shape[1]):
                kk = max(1, int(round(float(self.fracs[j]) * n)))
                outs.append(srt[:, j, :kk].mean(-1))
            p = torch.stack(outs, 1)
        return p + self.bias

class GapTopk(nn.Module):
    def __init__(self, k, fracs, os=8, width=0.25):
        super().__init__()
        self.net = PCAM(k, "resnet18", os, width=width); self.fracs = fracs
        self.bias = nn.Parameter(torch.zeros(k))
    def cams(self, x): return self.net.classifier(self.net.features(x))
    def forward(self, x):
        c = self.cams(x).flatten(2); n = c.shape[-1]
        srt = c.sort(-1, descending=True).values
        return torch.stack([srt[:, j, :max(1, int(round(self.fracs[j]*n)))].mean(-1) for j in range(c.shape[1])], 1) + self.bias

def cam_maps(model, x):
    c = F.relu(model.cams(x))
    c = F.interpolate(c, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return c / (c.flatten(2).max(-1).values[..., None, None] + 1e-5)

def evaluate(model, X, T, G, k, taus=(0.25, 0.4, 0.6), batch=64):
    model.eval(); inter = np.zeros((len(taus), k)); tot = np.zeros((len(taus), k))
    hit = np.zeros(k); cnt = np.zeros(k); mass_in = np.zeros(k); mass = np.zeros(k)
    with torch.no_grad():
        for a in range(0, len(X), batch):
            x = torch.from_numpy(X[a:a+batch])[:, None]
            c = cam_maps(model, x) * torch.from_numpy(T[a:a+batch]).float()[..., None, None]
            g = G[a:a+batch]; cn = c.numpy()
            for ti, tau in enumerate(taus):
                lab = torch.cat([torch.full_like(c[:, :1], tau), c], 1).argmax(1).numpy()
                for j in range(k):
                    p, q = lab == j+1, g == j+1
                    inter[ti, j] += (p & q).sum(); tot[ti, j] += p.sum() + q.sum()
            for j in range(k):
                for i in range(len(x)):
                    gm = g[i] == j+1
                    if T[a+i, j] and gm.any():
                        from scipy.ndimage import binary_dilation
                        pk = np.unravel_index(cn[i, j].argmax(), gm.shape)
                        hit[j] += binary_dilation(gm)[pk]; cnt[j] += 1
                        mass_in[j] += cn[i, j][gm].sum(); mass[j] += cn[i, j].sum()
    d = 2 * inter / np.maximum(tot, 1)
    return d, hit / np.maximum(cnt, 1), mass_in / np.maximum(mass, 1e-6)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir"); ap.add_argument("manifest"); ap.add_argument("variant")
    ap.add_argument("--epochs", type=int, default=30); ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--frac", type=float, default=0.01); ap.add_argument("--fracs", default=None)
    ap.add_argument("--width", type=int, default=32); ap.add_argument("--png"); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=int, default=4); ap.add_argument("--tag", default="")
    a = ap.parse_args()
    torch.manual_seed(a.seed); rng = np.random.default_rng(a.seed)
    co, data = load(a.workdir, a.manifest); k = co.num_classes
    X, T, G, Z = data["train"]
    fr = [float(v) for v in a.fracs.split(",")] if a.fracs else None
    v = a.variant
    if v.startswith("pcam"):  # the pipeline's model: pcam_<os>_<pooling>_<pos 0/1>
        from ccam.models.pcam import class_sides
        _, os_, pool, pos = v.split("_", 3)
        net = PCAM(k, "local", int(os_), width=a.width / 64, pooling=pool.replace("excl", "exclusive_topk"),
                   topk_fraction=a.frac, positional=pos == "1", sides=class_sides(co.classes))
        class W(nn.Module):
            def __init__(self, net):
                super().__init__(); self.net = net
            def cams(self, x): return self.net.restrict(self.net.classifier(self.net.features(x)), -1e4)
            def forward(self, x): return self.net(x)
        model = W(net)
    elif v == "gap": model = Gap(k)
    elif v == "gaptopk": model = GapTopk(k, fr or [a.frac]*k)
    else:
        depth, coord, pool = v.split("_")  # e.g. s_nc_topk, d_c_lse
        model = FCN(k, a.width, depth, coord == "c", pool, a.frac, fr)
        if coord in ("x", "px", "xl", "pxl"): model.excl = True
        if coord in ("p", "px", "pl", "pxl"): model.pos = nn.Conv2d(5, k, 1, bias=False)
        if coord.endswith("l"):
            from ccam.data.cohort import left_right_pairs
            side = torch.zeros(k)
            for l, r in left_right_pairs(co.classes): side[l - 1], side[r - 1] = 1.0, -1.0
            model.side = side
            print("sides", side.tolist())
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    steps = a.epochs * (len(X) // 16); t0 = time.time()
    for it in range(steps):
        idx = rng.choice(len(X), 16)
        x = torch.from_numpy(X[idx])[:, None]
        x = x * (1 + 0.1 * torch.randn(16, 1, 1, 1)) + 0.1 * torch.randn(16, 1, 1, 1)
        if a.shift: sh = rng.integers(-a.shift, a.shift + 1, 2); x = torch.roll(x, (int(sh[0]), int(sh[1])), (2, 3))
        model.train()
        loss = F.binary_cross_entropy_with_logits(model(x), torch.from_numpy(T[idx]).float())
        opt.zero_grad(); loss.backward(); opt.step()
    tt = time.time() - t0
    d, hit, mass = evaluate(model, X, T, G, k)
    Xv, Tv, Gv, _ = data["val"] if len(data["val"][0]) else data["train"]
    with torch.no_grad():
        model.eval(); lg = torch.cat([model(torch.from_numpy(Xv[i:i+64])[:, None]) for i in range(0, len(Xv), 64)])
    acc = ((lg > 0).numpy() == (Tv > 0)).mean(0)
    res = {"variant": v + a.tag, "width": a.width, "frac": a.frac, "seed": a.seed, "epochs": a.epochs, "train_s": round(tt, 1), "dice025": d[0].round(3).tolist(),
           "mean025": round(float(d[0].mean()), 3), "mean040": round(float(d[1].mean()), 3), "mean060": round(float(d[2].mean()), 3),
           "point": hit.round(2).tolist(), "mass_in": mass.round(2).tolist(), "val_acc": acc.round(2).tolist()}
    print(json.dumps(res)); out = REPO / "benchmarks" / "results" / "localisation_levers.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")
    if a.png:
        from loc_proto import png
        png(model, data["train"], co.classes, a.png)

if __name__ == "__main__": main()
