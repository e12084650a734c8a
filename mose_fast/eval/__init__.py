"""Evaluation: edit metrics (CounterFact, zsRE), general capability, stability, runners."""
