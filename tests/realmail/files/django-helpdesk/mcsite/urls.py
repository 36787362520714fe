from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # helpdesk's own urls include /login/, /logout/ and the API under /api/.
    path("", include("helpdesk.urls", namespace="helpdesk")),
]
