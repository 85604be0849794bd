"""candorlm.train"""
