"""candorlm.export"""
