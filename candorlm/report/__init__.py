"""candorlm.report"""
