"""Training the DDAS MLP autoencoder (METHODS.md section 2) with torch; its inference is numpy
(``edgeclip.train.ddas.MLPAutoencoder``). Imported lazily (``edgeclip.extras.import_torch_module``) so that
the linear gate and the whole RAIL add-task path stay torch-free."""

from __future__ import annotations

import numpy as np
import torch


def fit_mlp_autoencoder(x: np.ndarray, hidden: int, steps: int, lr: float, batch: int, seed: int
                        ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit D -> hidden -> D (ReLU) on the standardised embeddings z = (x - mu) * scale by Adam on MSE.

    x: [N,D] float32. Returns (mu [D], scale, w1 [D,H], b1 [H], w2 [H,D], b2 [D]) as float32 numpy arrays;
    the weights are initialised and the minibatches drawn from a local ``torch.Generator`` seeded by ``seed``
    (no global RNG is touched), so the result is deterministic on CPU.
    """
    mu = x.mean(axis=0)
    scale = 1.0 / float(np.sqrt(((x - mu) ** 2).mean()) + 1e-12)
    z = torch.from_numpy((x - mu) * scale)
    gen = torch.Generator().manual_seed(seed)
    enc, dec = torch.nn.Linear(x.shape[1], hidden), torch.nn.Linear(hidden, x.shape[1])
    with torch.no_grad():  # seeded init independent of the global torch RNG
        for layer in (enc, dec):
            bound = 1.0 / layer.in_features ** 0.5
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=lr)
    # Matmuls this small run fastest on one thread; more threads on a busy CPU ran 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            idx = torch.randint(0, z.shape[0], (min(batch, z.shape[0]),), generator=gen)
            zb = z[idx]  # [batch, D]
            loss = ((dec(torch.relu(enc(zb))) - zb) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return (mu, scale, enc.weight.T.numpy().copy(), enc.bias.numpy().copy(),
                dec.weight.T.numpy().copy(), dec.bias.numpy().copy())

