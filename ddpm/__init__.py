"""DDPM on MNIST: config, model, diffusion math, data, training, sampling."""
