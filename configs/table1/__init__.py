"""The paper's Table 1 as configs: one file per row, each inheriting
configs/default.py (the paper's best model) and changing only what differs.
`mardjax/ablation.py` lists them with the paper's figures."""
