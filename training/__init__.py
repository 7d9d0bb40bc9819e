"""dreamdata offline training: data sets, the DDPM training loop, named configs."""
