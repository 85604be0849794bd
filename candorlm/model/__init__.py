"""candorlm.model"""
