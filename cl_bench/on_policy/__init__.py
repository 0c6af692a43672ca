"""Learning from the policy's own completions: rollouts scored by the evaluation's scorers, then
GRPO's policy gradient (grpo.py) or SFT on the completions that pass (self_sft.py); chosen by
``learning=grpo|self_sft`` (cl_bench/training/learning.py has the interface and SFT)."""
