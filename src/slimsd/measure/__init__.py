"""Measuring models: latency / memory / MAC benchmarks, FID / IS / CLIP score evaluation."""
