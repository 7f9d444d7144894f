<?php
// Used by run.py once per php-fpm start to confirm that opcache is on.
header('Content-Type: text/plain');
$s = function_exists('opcache_get_status') ? opcache_get_status(false) : false;
echo ($s && $s['opcache_enabled']) ? 'opcache on' : 'opcache off';
