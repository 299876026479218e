"""pipeline.model"""
