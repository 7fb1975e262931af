"""Tools on top of training and analysis: the command line, the ablation runner and the benchmark."""
