"""The named variants the benchmarks compare: config overrides on top of a base config.

The eager fp32 baseline is every switch off; each other variant turns some on. A new fast path
joins the benchmarks by adding a line here.
"""
EAGER = ["model.kernels=torch", "model.attention=torch", "train.precision=fp32", "train.compile=none",
         "data.loader=resident"]

# Most telling first: a run cut short by a time limit has measured these.
TRAIN = {
    "eager-fp32": EAGER,  # the baseline
    "default": [],  # what `make train` runs on this device (all "auto")
    # DDP in a process group of one (SOLO_DDP): what `make train NPROC=2` runs (no graphs), and the
    # same with CUDA graphs; against default-no-cudagraph and default, what DDP's hooks cost
    "ddp-default": ["train.compile=default"],
    "ddp+cudagraph": ["train.compile=reduce-overhead"],
    "seed-like": [*EAGER, "data.loader=dataloader"],
    "eager-fp16": [*EAGER, "train.precision=fp16"],
    "eager-bf16": [*EAGER, "train.precision=bf16"],
    "compiled-auto+cudagraph": [*EAGER, "train.compile=reduce-overhead", "train.precision=auto"],
    "default-no-cudagraph": ["train.compile=default"],  # what DDP runs; against default: what graphs buy
    "compiled-auto": [*EAGER, "train.compile=default", "train.precision=auto"],
    "eager-sdpa-bf16": [*EAGER, "train.precision=bf16", "model.attention=sdpa"],
    "compiled-fp32": [*EAGER, "train.compile=default"],
    "compiled-auto+triton": [*EAGER, "train.compile=default", "train.precision=auto", "model.kernels=triton",
                             "model.attention=triton"],
    "compiled-auto+triton+sdpa": [*EAGER, "train.compile=default", "train.precision=auto", "model.kernels=triton",
                                  "model.attention=sdpa"],
    "compiled-auto+triton+cudagraph": [*EAGER, "train.compile=reduce-overhead", "train.precision=auto",
                                       "model.kernels=triton", "model.attention=triton"],
}
BASELINE = "eager-fp32"
SOLO_DDP = {"ddp-default", "ddp+cudagraph"}  # the UNet wrapped in DDP (ddpm.distributed.solo_group)

SAMPLE_EAGER = ["model.kernels=torch", "model.attention=torch", "sample.precision=fp32", "sample.compile=none",
                "sample.cuda_graph=disabled"]
SAMPLE = {
    "eager-fp32": SAMPLE_EAGER,
    "default": [],
    "compiled-fp32": [*SAMPLE_EAGER, "sample.compile=default"],
    "compiled-auto": [*SAMPLE_EAGER, "sample.compile=default", "sample.precision=auto"],
    "compiled-auto+cudagraph": [*SAMPLE_EAGER, "sample.compile=default", "sample.precision=auto",
                                "sample.cuda_graph=enabled"],
    "compiled-auto+cudagraph+triton": [*SAMPLE_EAGER, "sample.compile=default", "sample.precision=auto",
                                       "sample.cuda_graph=enabled", "model.kernels=triton", "model.attention=triton"],
    # the default with inductor's autotuning (Triton templates against cuDNN for the convolutions,
    # which are half the replayed step on an H200); its compile takes minutes, so not in the check
    "default-max-autotune": ["sample.compile=max-autotune"],
}

# Variants that need a GPU (CUDA graphs, bf16 autocast speed is meaningless on CPU, Triton would run
# in the interpreter) are skipped by the quick CPU run.
GPU_ONLY = {"ddp-default", "ddp+cudagraph", "eager-bf16", "eager-sdpa-bf16", "compiled-auto+triton",
            "compiled-auto+triton+sdpa", "compiled-auto+triton+cudagraph", "compiled-auto+cudagraph",
            "compiled-auto+cudagraph+triton", "default-no-cudagraph", "default-max-autotune"}

# What bench/gpu_check.sh measures within its time budget, in TRAIN's and SAMPLE's order. Each compiled
# variant costs a compile, so the eager ones (seconds; seed-like shows what the resident loader buys)
# come early. Training: the default (CUDA graphs, Triton ops); DDP without and with graphs (does
# NPROC=2's step want them?); against the same graphed step with torch.compile's own GroupNorm and
# attention (does the Triton op pay?), then the default without its graphs and plain compile (what
# the graphs buy). Sampling: the default against the same graph-replayed step with torch's kernels.
GPU_CHECK_TRAIN = ["eager-fp32", "default", "ddp-default", "ddp+cudagraph", "seed-like", "eager-fp16", "eager-bf16",
                   "compiled-auto+cudagraph", "default-no-cudagraph", "compiled-auto"]
GPU_CHECK_SAMPLE = ["eager-fp32", "default", "compiled-auto+cudagraph"]
