"""candorlm.data"""
