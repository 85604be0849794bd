"""candorlm.compress"""
