"""candorlm.serve"""
