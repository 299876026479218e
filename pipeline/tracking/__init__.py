"""pipeline.tracking"""
