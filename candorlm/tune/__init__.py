"""candorlm.tune"""
